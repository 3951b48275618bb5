"""The gateway's edge: what PostgreSQL would refuse is a 422 naming the field, before any
write, through a product body, a JSON import and JSON lines alike; other content types are
415; a committed request is never answered 5xx; the connection stays open after a 4xx."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import h11
import httpx
import pytest
import structlog
import uvicorn
from celery import Celery
from sqlalchemy import func, select

from aura.catalog import Import, ImportRecord, Product
from aura.config import Settings
from aura.db import Database
from aura.gateway import Gateway, create_app, create_tenant_with_key
from aura.worker.celery_app import make_celery_app
from tests import services
from tests.helpers import wait_until

BAD_VALUES = {"NaN": "NaN", "Infinity": "Infinity", "-Infinity": "-Infinity", "1e400": "1e400"}
NUL = '"a\\u0000b"'
# Each field of a product, and how to put a raw JSON value there.
FIELDS = [
    "title",
    "description",
    "brand",
    "category",
    "variants.0.sku",
    "variants.0.price",
    "variants.0.currency",
    "variants.0.attributes.w",
]


@pytest.fixture(scope="module")
def publisher(amqp_url: str) -> Celery:
    return make_celery_app(Settings(celery_broker_url=amqp_url))


@pytest.fixture
async def client(pg_database: Database, publisher: Celery) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Gateway(pg_database, publisher, {}))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
        yield http


async def tenant(database: Database) -> tuple[str, dict[str, str]]:
    async with database.session() as session:
        created, key = await create_tenant_with_key(session, f"edge-{uuid.uuid4().hex[:10]}")
        await session.commit()
    return str(created.id), {"X-API-Key": key}


def product_text(field: str | None = None, raw_value: str = "") -> str:
    """A valid product as JSON text, with ``raw_value`` (JSON text) put at ``field``."""
    document: dict[str, Any] = {
        "title": "Trail shoe",
        "description": "Light",
        "brand": "Acme",
        "category": "Shoes",
        "variants": [
            {
                "sku": f"E-{uuid.uuid4().hex[:8]}",
                "price": "59.90",
                "currency": "EUR",
                "attributes": {"w": 1},
            }
        ],
    }
    if field is None:
        return json.dumps(document)
    *parents, last = field.split(".")
    target: Any = document
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    target[last] = "__BAD__"
    return json.dumps(document).replace('"__BAD__"', raw_value)


async def written(database: Database, tenant_id: str) -> tuple[int, int]:
    async with database.session() as session:
        products = await session.scalar(
            select(func.count())
            .select_from(Product)
            .where(Product.tenant_id == uuid.UUID(tenant_id))
        )
        imports = await session.scalar(
            select(func.count()).select_from(Import).where(Import.tenant_id == uuid.UUID(tenant_id))
        )
    return int(products or 0), int(imports or 0)


@pytest.mark.parametrize("field", FIELDS)
async def test_values_postgresql_refuses_are_422_naming_the_field_in_every_body(
    client: httpx.AsyncClient, pg_database: Database, field: str
) -> None:
    tenant_id, key = await tenant(pg_database)
    for name, raw in [*BAD_VALUES.items(), ("NUL", NUL)]:
        record = product_text(field, raw)
        as_product = await client.post(
            f"/v1/tenants/{tenant_id}/products",
            content=record.encode(),
            headers={**key, "content-type": "application/json"},
        )
        as_array = await client.post(
            f"/v1/tenants/{tenant_id}/imports",
            content=f"[{product_text()}, {record}]".encode(),
            headers={**key, "content-type": "application/json"},
        )
        as_lines = await client.post(
            f"/v1/tenants/{tenant_id}/imports",
            content=f"{product_text()}\n\n{record}\n".encode(),
            headers={**key, "content-type": "application/x-ndjson"},
        )
        for response, expected in [
            (as_product, field),
            (as_array, f"records.1.{field}"),
            (as_lines, f"lines.3.{field}"),
        ]:
            assert response.status_code == 422, (name, response.text)
            error = response.json()["error"]
            assert [f["field"] for f in error["fields"]] == [expected], (name, error)
            assert "\n" not in error["message"]
        assert "1 of the records refused" in as_lines.json()["error"]["message"]
    assert await written(pg_database, tenant_id) == (0, 0)


async def test_a_nul_in_a_key_and_a_lone_surrogate_in_a_product_are_named(
    client: httpx.AsyncClient, pg_database: Database
) -> None:
    tenant_id, key = await tenant(pg_database)
    headers = {**key, "content-type": "application/json"}
    bad_key = product_text("variants.0.attributes", '{"a\\u0000": 1}')
    response = await client.post(
        f"/v1/tenants/{tenant_id}/products", content=bad_key, headers=headers
    )
    assert response.status_code == 422
    assert response.json()["error"]["fields"][0]["field"] == "variants.0.attributes.'a\\x00'"
    surrogate = product_text("title", '"x\\udcff"')
    response = await client.post(
        f"/v1/tenants/{tenant_id}/products", content=surrogate, headers=headers
    )
    assert response.status_code == 422
    assert response.json()["error"]["fields"][0]["field"] == "title"
    # In an import it is valid JSON PostgreSQL's json stores: the worker dead-letters it.
    travels = await client.post(
        f"/v1/tenants/{tenant_id}/imports",
        content=surrogate.encode(),
        headers={**key, "content-type": "application/x-ndjson"},
    )
    assert travels.status_code == 202, travels.text
    assert await written(pg_database, tenant_id) == (0, 1)


async def test_json_lines_are_bounded_per_line_and_every_bad_line_is_counted(
    client: httpx.AsyncClient, pg_database: Database
) -> None:
    tenant_id, key = await tenant(pg_database)
    ndjson = {**key, "content-type": "application/x-ndjson"}
    deep = "[" * 100_000 + "]" * 100_000
    shallow_but_too_deep = "[" * 40 + "]" * 40
    huge = '{"title": "' + "x" * (10 * 1024 * 1024) + '"}'
    lines = [product_text(), deep, "{broken", shallow_but_too_deep, huge, product_text()]
    response = await client.post(
        f"/v1/tenants/{tenant_id}/imports", content="\n".join(lines).encode(), headers=ndjson
    )
    assert response.status_code == 422, response.text[:500]
    error = response.json()["error"]
    # lines.4 is JSON but no record (a list): the worker's poison pill, as "{broken" is
    assert [f["field"] for f in error["fields"]] == ["lines.2", "lines.5"]
    assert "2 of the records refused" in error["message"]
    assert "nested deeper than 32" in error["fields"][0]["message"]
    assert "over the 262144 limit" in error["fields"][1]["message"]
    assert await written(pg_database, tenant_id) == (0, 0)
    # Not JSON at all is the worker's poison pill, as before: it travels.
    accepted = await client.post(
        f"/v1/tenants/{tenant_id}/imports",
        content=f"{product_text()}\r\n{{broken\r\n".encode(),
        headers=ndjson,
    )
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["accepted"] == 2


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("imports", "text/xml"),
        ("imports", ""),
        ("imports", "application/json; charset=latin-1"),
        ("products", "application/x-ndjson"),
        ("products", "text/plain"),
        ("products", "application/x-www-form-urlencoded"),
    ],
)
async def test_other_content_types_are_415(
    client: httpx.AsyncClient, pg_database: Database, path: str, content_type: str
) -> None:
    tenant_id, key = await tenant(pg_database)
    headers = {**key, "content-type": content_type} if content_type else key
    response = await client.post(
        f"/v1/tenants/{tenant_id}/{path}", content=product_text().encode(), headers=headers
    )
    assert response.status_code == 415, response.text
    assert response.json()["error"]["code"] == "unsupported_media_type"
    assert response.json()["error"]["fields"][0]["field"] == "content-type"
    assert await written(pg_database, tenant_id) == (0, 0)


class RawConnection:
    """One HTTP/1.1 connection, request after request (h11): what keep-alive means."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h11 = h11.Connection(h11.CLIENT)

    async def request(
        self, method: str, target: str, headers: dict[str, str], body: bytes = b""
    ) -> tuple[int, bytes]:
        if self.h11.our_state is h11.DONE:
            self.h11.start_next_cycle()
        sent = [("host", "gateway"), ("content-length", str(len(body))), *headers.items()]
        data = self.h11.send(h11.Request(method=method, target=target, headers=sent))
        data += self.h11.send(h11.Data(data=body)) + self.h11.send(h11.EndOfMessage())
        self.writer.write(data)
        await self.writer.drain()
        status, chunks = 0, bytearray()
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await asyncio.wait_for(self.reader.read(65536), 30))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, bytes(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                raise AssertionError("the server closed the connection")


@pytest.fixture
async def served(pg_database: Database, publisher: Celery) -> AsyncIterator[int]:
    """The gateway under a real uvicorn on a free loopback port."""
    app = create_app(Gateway(pg_database, publisher, {}))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None))
    task = asyncio.create_task(server.serve())

    async def started() -> bool:
        return server.started

    await wait_until(started, within=15)
    yield server.servers[0].sockets[0].getsockname()[1]
    server.should_exit = True
    await asyncio.wait_for(task, 15)


async def test_the_connection_stays_open_after_a_422(pg_database: Database, served: int) -> None:
    tenant_id, key = await tenant(pg_database)
    reader, writer = await asyncio.open_connection("127.0.0.1", served)
    connection = RawConnection(reader, writer)
    try:
        target = f"/v1/tenants/{tenant_id}/products"
        json_headers = {**key, "content-type": "application/json"}
        for raw in ["NaN", "1e400", NUL]:
            status, body = await connection.request(
                "POST", target, json_headers, product_text("title", raw).encode()
            )
            assert status == 422, body
        status, body = await connection.request("POST", target, {**key, "content-type": "text/xml"})
        assert status == 415, body
        status, body = await connection.request(
            "POST", target, json_headers, product_text().encode()
        )
        assert status == 201, body
    finally:
        writer.close()


@pytest.fixture
async def admin() -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(services.pg_test_url("postgresql"))
    yield connection
    await connection.close()


@pytest.mark.timeout(120)
async def test_an_import_while_backends_are_killed_is_202_committed_or_503_with_nothing(
    client: httpx.AsyncClient, pg_database: Database, admin: asyncpg.Connection
) -> None:
    tenant_id, key = await tenant(pg_database)
    ndjson = {**key, "content-type": "application/x-ndjson"}
    body = "\n".join(product_text() for _ in range(50)).encode()
    stop = asyncio.Event()

    pauses = [0.002 * 2**k for k in range(8)]  # 2 ms .. 256 ms: kills land everywhere

    async def kill_backends() -> None:
        for turn in itertools.count():
            if stop.is_set():
                return
            await admin.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity "
                "where datname = $1 and pid <> pg_backend_pid()",
                services.PG_TEST_DATABASE,
            )
            await asyncio.sleep(pauses[turn % len(pauses)])  # pacing the fault

    statuses: dict[int, int] = {}
    accepted: list[str] = []
    killer = asyncio.create_task(kill_backends())
    try:
        for _ in range(300):
            response = await client.post(
                f"/v1/tenants/{tenant_id}/imports", content=body, headers=ndjson
            )
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code == 202:
                accepted.append(response.json()["import_id"])
            else:
                assert response.json()["error"]["code"] == "unavailable", response.text
                assert response.headers["retry-after"] == "1"
            if statuses.get(202, 0) >= 5 and statuses.get(503, 0) >= 5:
                break
    finally:
        stop.set()
        await killer
    assert set(statuses) <= {202, 503}, statuses
    assert statuses.get(202, 0) >= 5, statuses  # both outcomes happened
    assert statuses.get(503, 0) >= 5, statuses
    async with pg_database.session() as session:
        imports = (
            await session.scalars(select(Import.id).where(Import.tenant_id == uuid.UUID(tenant_id)))
        ).all()
        records = dict(
            (
                await session.execute(
                    select(ImportRecord.import_id, func.count())
                    .where(ImportRecord.tenant_id == uuid.UUID(tenant_id))
                    .group_by(ImportRecord.import_id)
                )
            ).all()
        )
    # Every 202 is committed whole; no 503 left anything behind.
    assert sorted(str(i) for i in imports) == sorted(accepted)
    assert all(records[uuid.UUID(i)] == 50 for i in accepted)


class HeldPublisher:
    """A publisher whose sends wait until the test lets them go (requests held in flight)."""

    def __init__(self) -> None:
        self.entered = 0
        self.release = threading.Event()

    def send_task(self, name: str, **options: Any) -> None:
        self.entered += 1
        assert self.release.wait(30), "the test never let the publish go"


@pytest.mark.parametrize("congested", [True, False], ids=["congested", "keeping-up"])
async def test_past_capacity_requests_are_shed_with_503_and_retry_after(
    pg_database: Database, congested: bool
) -> None:
    """Two slots, both requests committed and waiting for their publish. While the
    publisher keeps up they gave their slots back (a third is served); when its backlog
    is past its bound they keep them, and a third is shed, writing nothing."""
    tenant_id, key = await tenant(pg_database)
    held = HeldPublisher()
    gateway = Gateway(pg_database, held, {}, max_in_flight=2, max_wait=0, tenant_share=1.0)  # type: ignore[arg-type]
    if congested:
        gateway.outbox.max_backlog = 0  # every request finds the publisher congested
    app = create_app(gateway)
    transport = httpx.ASGITransport(app=app)
    headers = {**key, "content-type": "application/json"}
    url = f"/v1/tenants/{tenant_id}/products"
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        in_flight = [
            asyncio.create_task(client.post(url, content=product_text(), headers=headers))
            for _ in range(2)
        ]

        async def both_held() -> bool:  # both committed, waiting for the held publish
            return held.entered >= 1 and await written(pg_database, tenant_id) == (2, 0)

        try:
            await wait_until(both_held, within=15)
            third = asyncio.create_task(client.post(url, content=product_text(), headers=headers))
            if congested:
                shed = await third
            else:

                async def third_written() -> bool:
                    return await written(pg_database, tenant_id) == (3, 0)

                await wait_until(third_written, within=15)
            health = await client.get("/healthz")
        finally:
            held.release.set()
        served = await asyncio.gather(*in_flight)
        after = await client.post(url, content=product_text(), headers=headers)
    assert health.status_code == 200  # never shed
    assert [r.status_code for r in served] == [201, 201]
    assert after.status_code == 201  # capacity is back
    if congested:
        assert shed.status_code == 503
        assert shed.headers["retry-after"] == "1"
        assert shed.json()["error"]["code"] == "overloaded"
        assert await written(pg_database, tenant_id) == (3, 0)  # the shed one wrote nothing
    else:
        assert (await third).status_code == 201
        assert await written(pg_database, tenant_id) == (4, 0)


async def test_valid_keys_are_cached_for_a_while_unknown_ones_never(
    pg_database: Database,
) -> None:
    from aura.gateway.auth import KeyCache
    from tests.helpers import FakeClock

    tenant_id, key = await tenant(pg_database)
    clock = FakeClock()
    cache = KeyCache(ttl=10, size=1, clock=clock)
    lookups = 0

    class CountingSession:
        async def scalar(self, statement: Any) -> Any:
            nonlocal lookups
            lookups += 1
            async with pg_database.session() as session:
                return await session.scalar(statement)

    session: Any = CountingSession()
    assert str(await cache.tenant_for_key(session, key["X-API-Key"])) == tenant_id
    assert str(await cache.tenant_for_key(session, key["X-API-Key"])) == tenant_id
    assert lookups == 1
    clock.advance(11)
    assert str(await cache.tenant_for_key(session, key["X-API-Key"])) == tenant_id
    assert lookups == 2
    assert await cache.tenant_for_key(session, "aura_unknown") is None
    assert await cache.tenant_for_key(session, "aura_unknown") is None
    assert lookups == 4


class _Gate:
    """An ASGI app whose requests wait until the test opens the gate; counts who entered."""

    def __init__(self) -> None:
        self.entered = 0
        self.open = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["path"].startswith("/v1/"):
            self.entered += 1
            await self.open.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def _shedder_client(
    limit: int, max_wait: float, max_waiting: int | None = None
) -> tuple[_Gate, Any, httpx.AsyncClient]:
    from aura.gateway.guard import LoadShedder

    gate = _Gate()
    shedder = LoadShedder(gate, limit, max_wait=max_wait, max_waiting=max_waiting)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=shedder), base_url="http://gw")
    return gate, shedder, client


async def test_past_capacity_a_request_waits_for_a_slot_and_is_served_in_order() -> None:
    gate, shedder, client = await _shedder_client(limit=2, max_wait=30)
    async with client:
        calls = [asyncio.create_task(client.get("/v1/x")) for _ in range(5)]

        async def queued() -> bool:
            return gate.entered == 2 and len(shedder._waiters) == 3

        await wait_until(queued, within=10)
        assert shedder.in_flight == 2  # the limit holds while three wait
        gate.open.set()
        answers = await asyncio.gather(*calls)
    assert [a.status_code for a in answers] == [200] * 5
    assert gate.entered == 5
    assert shedder.in_flight == 0


async def test_past_the_wait_or_the_queue_bound_a_request_is_shed() -> None:
    gate, shedder, client = await _shedder_client(limit=1, max_wait=0.05, max_waiting=1)
    async with client:
        first = asyncio.create_task(client.get("/v1/x"))

        async def busy() -> bool:
            return gate.entered == 1

        await wait_until(busy, within=10)
        waited = asyncio.create_task(client.get("/v1/x"))  # waits 50 ms, then is shed

        async def waiting() -> bool:
            return len(shedder._waiters) == 1

        await wait_until(waiting, within=10)
        full = await client.get("/v1/x")  # the queue holds one: shed at once
        shed = await waited
        health = await client.get("/healthz")  # never waits
        gate.open.set()
        served = await first
    assert full.status_code == 503
    assert full.headers["retry-after"] == "1"
    assert shed.status_code == 503
    assert shed.json()["error"]["code"] == "overloaded"
    assert health.status_code == 200
    assert served.status_code == 200
    assert shedder.in_flight == 0
    assert gate.entered == 1  # the shed ones never reached the app


async def test_a_waiter_that_goes_away_gives_its_slot_to_the_next() -> None:
    gate, shedder, client = await _shedder_client(limit=1, max_wait=30)
    async with client:
        first = asyncio.create_task(client.get("/v1/x"))
        leaving = asyncio.create_task(client.get("/v1/x"))
        staying = asyncio.create_task(client.get("/v1/x"))

        async def two_wait() -> bool:
            return gate.entered == 1 and len(shedder._waiters) == 2

        await wait_until(two_wait, within=10)
        leaving.cancel()
        gate.open.set()
        assert (await first).status_code == 200
        assert (await staying).status_code == 200
        with pytest.raises(asyncio.CancelledError):
            await leaving
    assert gate.entered == 2
    assert shedder.in_flight == 0


def _raised_from(cause: BaseException) -> BaseException:
    try:
        raise RuntimeError("wrapped") from cause
    except RuntimeError as exc:
        return exc


@pytest.mark.parametrize(
    ("sqlstate", "unavailable"),
    [
        ("53300", True),  # too many connections: saturated, retry later
        ("57P01", True),  # admin shutdown
        ("08006", True),  # connection failure
        ("23505", False),  # a unique violation is our bug or the client's, never 503
        ("22P02", False),
    ],
)
def test_a_database_that_cannot_take_the_request_now_is_503_not_500(
    sqlstate: str, unavailable: bool
) -> None:
    from aura.gateway.guard import is_unavailable

    class DriverError(Exception):
        pass

    error = DriverError("sorry, too many clients already")
    error.sqlstate = sqlstate  # type: ignore[attr-defined]
    assert is_unavailable(_raised_from(error)) is unavailable


async def test_a_client_that_goes_away_mid_body_is_not_an_error(pg_database: Database) -> None:
    tenant_id, key = await tenant(pg_database)
    app = create_app(Gateway(pg_database, None, {}))  # type: ignore[arg-type]
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": f"/v1/tenants/{tenant_id}/products",
        "raw_path": f"/v1/tenants/{tenant_id}/products".encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"x-api-key", key["X-API-Key"].encode()),
            (b"content-type", b"application/json"),
        ],
        "server": ("gw", 80),
        "client": ("127.0.0.1", 1),
    }
    messages = iter(
        [
            {"type": "http.request", "body": b'{"title": ', "more_body": True},
            {"type": "http.disconnect"},
        ]
    )

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with structlog.testing.capture_logs() as logged:
        await app(scope, receive, send)
    assert sent == []  # no one to answer
    assert [e["log_level"] for e in logged] == ["info"]
    assert await written(pg_database, tenant_id) == (0, 0)


class _EarlyRelease:
    """An app whose /v1/ requests give their slot back (``release_slot``), then wait."""

    def __init__(self) -> None:
        self.entered = 0
        self.open = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        from aura.gateway.guard import release_slot

        self.entered += 1
        release_slot(scope)
        release_slot(scope)  # a second call is a no-op
        await self.open.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def test_a_request_that_gives_its_slot_back_lets_the_next_one_in_once() -> None:
    from aura.gateway.guard import LoadShedder

    app = _EarlyRelease()
    shedder = LoadShedder(app, 1, max_wait=30)
    transport = httpx.ASGITransport(app=shedder)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        calls = [asyncio.create_task(client.get("/v1/x")) for _ in range(3)]

        async def all_in() -> bool:
            return app.entered == 3  # with a limit of 1, only early release lets them in

        await wait_until(all_in, within=10)
        assert shedder.in_flight == 0
        app.open.set()
        answers = await asyncio.gather(*calls)
    assert [a.status_code for a in answers] == [200] * 3
    assert shedder.in_flight == 0  # each slot was given back once, not twice
