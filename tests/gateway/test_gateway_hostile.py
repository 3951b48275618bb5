"""The gateway under hostile and careless clients, as a real ``aura gateway`` process (its
own port; the run's database and vhost): an unauthenticated flood, idle half-sent
requests, one tenant's trickled uploads, a readiness stampede, oversized records, keys in
query strings, encoded bodies and malformed headers. Every run is bounded in count and
time; correctness is asserted here (errors, closes, fates), latency is measured by
``bench/gateway_load.py``.

The gateway runs with short read limits (2 s for headers, a 2 s grace for bodies), so a
test waits seconds, not the defaults' tens of seconds.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest

from aura.db import Database
from aura.gateway import create_tenant_with_key
from tests.helpers import running_gateway, wait_for

pytestmark = pytest.mark.timeout(180)
HEADER_TIMEOUT = 2.0
BODY_GRACE = 2.0


@pytest.fixture(scope="module")
def gateway(
    pg_url: str, amqp_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    log = tmp_path_factory.mktemp("hostile") / "gateway.log"
    env = {
        "DATABASE_URL": pg_url,
        "CELERY_BROKER_URL": amqp_url,
        "REDIS_URL": redis_url,
        "LOG_LEVEL": "INFO",
        "LOG_FORMAT": "json",
        "GATEWAY_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "GATEWAY_BODY_GRACE": str(BODY_GRACE),
        "GATEWAY_BODY_IDLE_TIMEOUT": "3",
        "GATEWAY_MAX_WAIT": "0.5",
        "AURA_ENV_FILE": "",
    }
    with running_gateway(env, log) as (port, process):
        base = f"http://127.0.0.1:{port}"
        yield {"base": base, "port": port, "log": log, "process": process}


async def new_tenant(database: Database) -> tuple[str, str]:
    async with database.session() as session:
        tenant, key = await create_tenant_with_key(session, f"hostile-{uuid.uuid4().hex[:8]}")
        await session.commit()
    return str(tenant.id), key


def product(n: int = 0) -> bytes:
    variant = {"sku": f"H-{uuid.uuid4().hex[:8]}", "price": "59.90", "currency": "EUR"}
    document = {"title": f"shoe {n}", "brand": "b", "category": "c", "variants": [variant]}
    return json.dumps(document).encode()


async def raw_request(port: int, data: bytes, *, within: float = 10.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), within)
    finally:
        writer.close()


async def test_an_unauthenticated_flood_takes_no_tenants_slot(
    gateway: dict[str, Any], pg_database: Database
) -> None:
    tenant_id, key = await new_tenant(pg_database)
    port, path = gateway["port"], f"/v1/tenants/{tenant_id}/products?limit=5"
    stop = asyncio.Event()
    answers: dict[int, int] = {}

    async def attacker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while not stop.is_set():
                bad = "aura_" + uuid.uuid4().hex
                writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\nx-api-key: {bad}\r\n\r\n".encode())
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                answers[status] = answers.get(status, 0) + 1
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                await reader.readexactly(length)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async with httpx.AsyncClient(base_url=gateway["base"], timeout=30) as client:
        headers = {"x-api-key": key}
        assert (await client.get(path, headers=headers)).status_code == 200  # known good
        attackers = [asyncio.create_task(attacker()) for _ in range(400)]
        try:
            await asyncio.sleep(1.0)  # the flood is on
            served = [(await client.get(path, headers=headers)).status_code for _ in range(40)]
        finally:
            stop.set()
            await asyncio.gather(*attackers, return_exceptions=True)
    assert served == [200] * 40  # 0 errors: never 503 overloaded, never 429
    assert set(answers) <= {401, 429}
    assert answers.get(429, 0) > 0  # the flood was limited, not served lookups


async def test_idle_half_sent_requests_are_closed_and_a_normal_client_served(
    gateway: dict[str, Any],
) -> None:
    port = gateway["port"]
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(5000):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")  # never the blank line
        opened.append((reader, writer))
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=gateway["base"], timeout=30) as client:
        assert (await client.get("/healthz")).status_code == 200  # served beside them

    async def closed(reader: asyncio.StreamReader) -> bytes:
        data = b""
        while chunk := await reader.read(4096):
            data += chunk
        return data

    answers = await asyncio.wait_for(
        asyncio.gather(*(closed(reader) for reader, _ in opened)), HEADER_TIMEOUT + 30
    )
    for _, writer in opened:
        writer.close()
    assert time.monotonic() - started < HEADER_TIMEOUT + 30
    assert all(answer.startswith(b"HTTP/1.1 408") for answer in answers)
    assert b'"code": "timeout"' in answers[0]


async def test_one_tenants_slow_uploads_do_not_shut_another_out(
    gateway: dict[str, Any], pg_database: Database
) -> None:
    a_id, a_key = await new_tenant(pg_database)
    b_id, b_key = await new_tenant(pg_database)
    port = gateway["port"]
    body = json.dumps([{"title": f"slow {n}"} for n in range(20)]).encode()
    head = (
        f"POST /v1/tenants/{a_id}/imports HTTP/1.1\r\nhost: x\r\nx-api-key: {a_key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    trickles: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(70):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head + body[:1])
        trickles.append((reader, writer))
    stop = asyncio.Event()

    async def trickle(writer: asyncio.StreamWriter) -> None:
        with_offset = 1
        while not stop.is_set() and with_offset < len(body):
            await asyncio.sleep(1.0)
            try:
                writer.write(body[with_offset : with_offset + 1])  # 1 byte a second
                await writer.drain()
            except ConnectionError:
                return
            with_offset += 1

    tasks = [asyncio.create_task(trickle(writer)) for _, writer in trickles]
    try:
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(base_url=gateway["base"], timeout=30) as client:
            served = [
                (
                    await client.post(
                        f"/v1/tenants/{b_id}/products",
                        content=product(n),
                        headers={"x-api-key": b_key, "content-type": "application/json"},
                    )
                ).status_code
                for n in range(10)
            ]
        assert served == [201] * 10  # 0 errors for tenant B

        async def answer(reader: asyncio.StreamReader) -> bytes:
            data = b""
            try:
                while chunk := await reader.read(4096):
                    data += chunk
            except ConnectionResetError:  # closed while our next byte was on its way
                pass
            return data

        answers = await asyncio.wait_for(
            asyncio.gather(*(answer(reader) for reader, _ in trickles)), BODY_GRACE + 30
        )
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _, writer in trickles:
            writer.close()
    # every one closed (the gather returned): too slow (408) or past A's share (503)
    statuses = {a.split(b" ", 2)[1] for a in answers if a}
    assert statuses <= {b"408", b"503"}
    assert b"408" in statuses


async def test_a_readiness_stampede_opens_no_connections(
    gateway: dict[str, Any], pg_url: str
) -> None:
    dsn = pg_url.replace("postgresql+asyncpg", "postgresql")
    admin = await asyncpg.connect(dsn)
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid()"
    )
    try:
        async with httpx.AsyncClient(base_url=gateway["base"], timeout=30) as client:
            assert (await client.get("/readyz")).status_code in (200, 503)  # warm
            await asyncio.sleep(1.2)
            before = await admin.fetchval(query)
            for _ in range(5):
                answers = await asyncio.gather(*(client.get("/readyz") for _ in range(60)))
                assert all(r.status_code == 200 for r in answers), answers[0].text
            after = await admin.fetchval(query)
    finally:
        await admin.close()
    assert after <= before  # answered from the probe's state: no connection per call


async def test_oversized_array_records_and_non_objects_are_refused_by_index(
    gateway: dict[str, Any], pg_database: Database
) -> None:
    tenant_id, key = await new_tenant(pg_database)
    headers = {"x-api-key": key, "content-type": "application/json"}
    url = f"/v1/tenants/{tenant_id}/imports"
    async with httpx.AsyncClient(base_url=gateway["base"], timeout=60) as client:
        described = [{"title": "ok"}, {"title": "d", "description": "x" * 3_000_000}]
        big = await client.post(url, content=json.dumps(described), headers=headers)
        fields = {f"f{i}": "y" * 10_000_000 for i in range(10)}
        huge = await client.post(
            url, content=json.dumps([{"title": "t", **fields}]), headers=headers
        )
        odd = await client.post(url, content=b"[1, true, null]", headers=headers)
    assert big.status_code == 422
    assert big.json()["error"]["fields"][0]["field"] == "records.1"
    assert "over the" in big.json()["error"]["fields"][0]["message"]
    assert huge.status_code == 413
    assert odd.status_code == 422
    assert [f["field"] for f in odd.json()["error"]["fields"]] == [
        "records.0", "records.1", "records.2",
    ]  # fmt: skip


async def test_keys_in_query_strings_never_reach_the_log_and_encodings_are_415(
    gateway: dict[str, Any], pg_database: Database
) -> None:
    tenant_id, key = await new_tenant(pg_database)
    async with httpx.AsyncClient(base_url=gateway["base"], timeout=30) as client:
        await client.get(f"/v1/tenants/{tenant_id}/products", params={"api_key": key})
        await client.get(f"/v1/tenants/{tenant_id}/products?x=1&api_key={key}&y=2")
        encoded = await client.post(
            f"/v1/tenants/{tenant_id}/products",
            content=product(),
            headers={
                "x-api-key": key,
                "content-type": "application/json",
                "content-encoding": "br",
            },
        )
    assert encoded.status_code == 415
    assert encoded.json()["error"]["code"] == "unsupported_media_type"

    def logged() -> bool:
        return "api_key=***" in gateway["log"].read_text()

    wait_for(logged, within=10)
    assert key[5:15] not in gateway["log"].read_text()


async def test_a_malformed_header_gets_our_error_body(gateway: dict[str, Any]) -> None:
    answer = await raw_request(
        gateway["port"], b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-api-key: aura_\x00x\r\n\r\n"
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert json.loads(body)["error"]["code"] == "bad_request"
    too_big = await raw_request(
        gateway["port"], b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + b"x-pad: " + b"a" * 70_000
    )
    assert too_big.startswith(b"HTTP/1.1 431")
