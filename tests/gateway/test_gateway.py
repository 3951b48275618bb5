"""The gateway on real PostgreSQL and RabbitMQ: every endpoint, every bad-input class."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from celery import Celery
from kombu.connection import Connection

from aura.config import Settings
from aura.contract import BULK_QUEUE, PLATFORM_QUEUES, REALTIME_QUEUE
from aura.db import Database
from aura.gateway import Gateway, create_app, create_tenant_with_key
from aura.gateway.readiness import default_checks
from aura.messaging.topology import work_queues
from aura.worker.celery_app import make_celery_app
from tests.helpers import forget_held_rows, wait_until


@pytest.fixture(scope="module")
def publisher(amqp_url: str) -> Celery:
    return make_celery_app(Settings(celery_broker_url=amqp_url))


def gateway_client(database: Database, publisher: Celery, settings: Settings) -> httpx.AsyncClient:
    app = create_app(Gateway(database, publisher, default_checks(settings)))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


@pytest.fixture
async def client(
    pg_database: Database, publisher: Celery, amqp_url: str, redis_url: str
) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(celery_broker_url=amqp_url, redis_url=redis_url)
    async with gateway_client(pg_database, publisher, settings) as http:
        yield http


async def tenant(database: Database) -> tuple[str, dict[str, str]]:
    async with database.session() as session:
        created, key = await create_tenant_with_key(session, f"t-{uuid.uuid4().hex[:10]}")
        await session.commit()
    return str(created.id), {"X-API-Key": key}


def product(*skus: str) -> dict[str, Any]:
    return {
        "title": "Trail shoe",
        "brand": "Acme",
        "variants": [{"sku": s, "price": "59.90", "currency": "EUR"} for s in skus or ("A-1",)],
    }


async def take_message(amqp_url: str, queue: str, task_id: str) -> tuple[dict[str, Any], Any]:
    """Find the message of ``task_id`` on ``queue`` (bounded scan, looked for again until
    10 s passed: an import's records reach the queue through the fair dispatcher); ack
    it; return it."""
    declared = {q.name: q for q in work_queues(PLATFORM_QUEUES)}
    deadline = time.monotonic() + 10.0
    while True:
        with Connection(amqp_url) as connection:
            channel = connection.channel()
            bound = declared[queue](channel)
            bound.declare()  # as a worker would: the dispatcher may not have published yet
            for _ in range(2000):
                message = bound.get(no_ack=False)
                if message is None:
                    break
                if message.headers.get("id") == task_id:
                    message.ack()
                    return message.headers, json.loads(message.body)
            channel.close()  # everything else goes back
        if time.monotonic() >= deadline:
            raise AssertionError(f"no message {task_id} on {queue}")
        await asyncio.sleep(0.05)  # the dispatcher runs on this loop


async def test_post_product_writes_it_and_queues_its_enrichment(
    client: httpx.AsyncClient, pg_database: Database, amqp_url: str
) -> None:
    tenant_id, key = await tenant(pg_database)
    created = await client.post(
        f"/v1/tenants/{tenant_id}/products", json=product("P-1", "P-2"), headers=key
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert [v["sku"] for v in body["variants"]] == ["P-1", "P-2"]
    assert body["enrichment"] == {"state": "pending"}
    headers, (args, _kwargs, _embed) = await take_message(
        amqp_url, REALTIME_QUEUE, f"enrich-{body['id']}"
    )
    assert headers["task"] == "aura.enrich_product"
    assert args == [body["id"], tenant_id]

    fetched = await client.get(f"/v1/tenants/{tenant_id}/products/{body['id']}", headers=key)
    assert fetched.status_code == 200
    assert fetched.json()["title"] == "Trail shoe"


async def test_products_are_listed_in_pages(
    client: httpx.AsyncClient, pg_database: Database
) -> None:
    tenant_id, key = await tenant(pg_database)
    for i in range(3):
        response = await client.post(
            f"/v1/tenants/{tenant_id}/products", json=product(f"L-{i}"), headers=key
        )
        assert response.status_code == 201
    page = await client.get(f"/v1/tenants/{tenant_id}/products?limit=2", headers=key)
    assert page.status_code == 200
    assert page.json()["total"] == 3
    assert len(page.json()["items"]) == 2
    rest = await client.get(f"/v1/tenants/{tenant_id}/products?limit=2&offset=2", headers=key)
    assert len(rest.json()["items"]) == 1
    too_many = await client.get(f"/v1/tenants/{tenant_id}/products?limit=1000", headers=key)
    assert too_many.status_code == 422
    assert too_many.json()["error"]["fields"][0]["field"] == "limit"


@pytest.mark.parametrize(
    ("body", "content_type", "status", "field"),
    [
        (b"{not json", "application/json", 422, "body"),
        (
            json.dumps({"title": "T", "variants": [{"sku": "X", "price": "abc"}]}).encode(),
            "application/json",
            422,
            "variants.0.price",
        ),
        (
            json.dumps({"title": 5, "variants": [{"sku": "X", "price": 1}]}).encode(),
            "application/json",
            422,
            "title",
        ),
        (json.dumps({"variants": []}).encode(), "application/json", 422, "title"),
        (b"[" * 100 + b"]" * 100, "application/json", 422, "body"),
        (b"x" * (300 * 1024), "application/json", 413, "body"),
    ],
)
async def test_bad_product_bodies_are_4xx_naming_the_field_and_write_nothing(
    client: httpx.AsyncClient,
    pg_database: Database,
    body: bytes,
    content_type: str,
    status: int,
    field: str,
) -> None:
    tenant_id, key = await tenant(pg_database)
    response = await client.post(
        f"/v1/tenants/{tenant_id}/products",
        content=body,
        headers={**key, "content-type": content_type},
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["fields"][0]["field"] == field
    listed = await client.get(f"/v1/tenants/{tenant_id}/products", headers=key)
    assert listed.json()["total"] == 0


async def test_keys_see_only_their_own_tenant(
    client: httpx.AsyncClient, pg_database: Database
) -> None:
    tenant_a, key_a = await tenant(pg_database)
    tenant_b, key_b = await tenant(pg_database)
    made = await client.post(f"/v1/tenants/{tenant_a}/products", json=product("O-1"), headers=key_a)
    product_id = made.json()["id"]

    missing = await client.get(f"/v1/tenants/{tenant_a}/products/{product_id}")
    assert missing.status_code == 401
    assert missing.json()["error"]["fields"][0]["field"] == "X-API-Key"
    wrong = await client.get(
        f"/v1/tenants/{tenant_a}/products/{product_id}", headers={"X-API-Key": "aura_nope"}
    )
    assert wrong.status_code == 401
    other = await client.get(f"/v1/tenants/{tenant_a}/products/{product_id}", headers=key_b)
    assert other.status_code == 404  # another tenant's product does not exist for this key
    unknown = await client.get(f"/v1/tenants/{uuid.uuid4()}/products", headers=key_b)
    assert unknown.status_code == 404
    not_yours = await client.get(f"/v1/tenants/{tenant_b}/products/{product_id}", headers=key_b)
    assert not_yours.status_code == 404
    bad_id = await client.get(f"/v1/tenants/{tenant_a}/products/not-a-uuid", headers=key_a)
    assert bad_id.status_code == 422
    assert bad_id.json()["error"]["fields"][0]["field"] == "product_id"
    for path in ("products", "imports"):  # the writes' direct route leaves these to FastAPI
        bad_tenant = await client.post(f"/v1/tenants/not-a-uuid/{path}", json=[], headers=key_a)
        assert bad_tenant.status_code == 422
        assert bad_tenant.json()["error"]["fields"][0]["field"] == "tenant_id"
        upper = await client.post(f"/v1/tenants/{str(tenant_a).upper()}/{path}", headers=key_a)
        assert upper.status_code != 404  # the same tenant, however the UUID is spelled


async def test_a_duplicate_sku_is_a_conflict(
    client: httpx.AsyncClient, pg_database: Database
) -> None:
    tenant_id, key = await tenant(pg_database)
    assert (
        await client.post(f"/v1/tenants/{tenant_id}/products", json=product("D-1"), headers=key)
    ).status_code == 201
    again = await client.post(f"/v1/tenants/{tenant_id}/products", json=product("D-1"), headers=key)
    assert again.status_code == 409
    assert "'D-1'" in again.json()["error"]["message"]


async def test_imports_queue_every_record_as_it_came(
    client: httpx.AsyncClient, pg_database: Database, amqp_url: str
) -> None:
    tenant_id, key = await tenant(pg_database)
    lines = '{"title": "A", "variants": [{"sku": "I-1", "price": 1}]}\n{broken\n{"title": "C"}\n'
    accepted = await client.post(
        f"/v1/tenants/{tenant_id}/imports",
        content=lines.encode(),
        headers={**key, "content-type": "application/x-ndjson"},
    )
    assert accepted.status_code == 202, accepted.text
    import_id = accepted.json()["import_id"]
    assert accepted.json()["accepted"] == 3

    counts = await client.get(f"/v1/tenants/{tenant_id}/imports/{import_id}", headers=key)
    assert counts.json() == {
        "import_id": import_id,
        "accepted": 3,
        "pending": 3,
        "done": 0,
        "dead_lettered": 0,
    }
    async with pg_database.session() as session:
        from sqlalchemy import select

        from aura.catalog import ImportRecord

        ids = (
            await session.scalars(
                select(ImportRecord.message_id)
                .where(ImportRecord.import_id == uuid.UUID(import_id))
                .order_by(ImportRecord.position)
            )
        ).all()
    _, (args, kwargs, _) = await take_message(amqp_url, BULK_QUEUE, ids[1])
    assert args == ["{broken", tenant_id]  # the malformed record travels as it came
    assert kwargs == {"import_id": import_id}

    as_array = await client.post(
        f"/v1/tenants/{tenant_id}/imports", json=[{"title": "x"}, 5], headers=key
    )
    assert as_array.status_code == 422  # a record that is not an object, named by its index
    assert as_array.json()["error"]["fields"][0]["field"] == "records.1"
    not_array = await client.post(f"/v1/tenants/{tenant_id}/imports", json={"a": 1}, headers=key)
    assert not_array.status_code == 422
    empty = await client.post(
        f"/v1/tenants/{tenant_id}/imports",
        content=b"\n\n",
        headers={**key, "content-type": "application/x-ndjson"},
    )
    assert empty.status_code == 422
    unknown = await client.get(f"/v1/tenants/{tenant_id}/imports/{uuid.uuid4()}", headers=key)
    assert unknown.status_code == 404


async def test_health_readiness_and_metrics(
    client: httpx.AsyncClient, pg_database: Database, publisher: Celery, amqp_url: str
) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "redis": "ok", "broker": "ok"}
    metrics = await client.get("/metrics")
    assert "messages_sent_to_dlq_total" in metrics.text
    assert "sqlalchemy_pool_connections_active" in metrics.text

    redis_down = Settings(celery_broker_url=amqp_url, redis_url="redis://127.0.0.1:1/0")
    async with gateway_client(pg_database, publisher, redis_down) as degraded:
        response = await degraded.get("/readyz")
    # Reported, not waited on: the gateway never uses Redis, and the fleet runs without it
    assert response.status_code == 200
    assert response.json()["checks"]["redis"].startswith("unavailable")
    assert response.json()["checks"]["database"] == "ok"
    no_database = Settings(celery_broker_url=amqp_url, redis_url="redis://127.0.0.1:1/0")
    dead = Database("postgresql+asyncpg://postgres@127.0.0.1:1/nowhere")
    try:
        async with gateway_client(dead, publisher, no_database) as down:
            response = await down.get("/readyz")
    finally:
        await dead.dispose()
    assert response.status_code == 503
    assert response.json()["checks"]["database"].startswith("unavailable")


@pytest.mark.parametrize("streamed", [True, False])
async def test_oversized_imports_are_refused_and_write_nothing(
    pg_database: Database, publisher: Celery, streamed: bool
) -> None:
    from sqlalchemy import func, select

    from aura.catalog import Import
    from aura.gateway.app import MAX_IMPORT_BYTES

    tenant_id, key = await tenant(pg_database)
    limited = Gateway(pg_database, publisher, {}, import_max_records=50, import_max_bytes=4000)
    headers = {**key, "content-type": "application/x-ndjson" if streamed else "application/json"}

    def body(records: int) -> bytes:
        return b"{}\n" * records if streamed else b"[" + b",".join([b"{}"] * records) + b"]"

    transport = httpx.ASGITransport(app=create_app(limited))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        url = f"/v1/tenants/{tenant_id}/imports"
        too_many = await client.post(url, content=body(51), headers=headers)
        assert too_many.status_code == 422
        assert too_many.json()["error"]["fields"][0]["field"] == "body"
        assert "at most 50 records (IMPORT_MAX_RECORDS)" in too_many.json()["error"]["message"]
        limit = 4000 if streamed else MAX_IMPORT_BYTES  # an array is read whole: 16 MiB
        too_large = await client.post(url, content=b" " * (limit + 1), headers=headers)
        assert too_large.status_code == 413
        assert str(limit) in too_large.json()["error"]["message"]
        just_right = await client.post(url, content=body(50), headers=headers)
        assert just_right.status_code == 202  # (records of {} are the worker's poison)
    async with pg_database.session() as session:
        imports = await session.scalar(
            select(func.count()).select_from(Import).where(Import.tenant_id == uuid.UUID(tenant_id))
        )
    assert imports == 1


async def outbox_ids(database: Database, tenant_id: str) -> set[str]:
    from sqlalchemy import select

    from aura.db import OutboxMessage

    async with database.session() as session:
        rows = await session.scalars(
            select(OutboxMessage.message_id).where(OutboxMessage.tenant_id == uuid.UUID(tenant_id))
        )
        return set(rows.all())


async def test_a_broker_outage_loses_nothing_the_outbox_relay_sends_it_later(
    pg_database: Database, publisher: Celery, amqp_url: str, redis_url: str
) -> None:
    from datetime import UTC, datetime, timedelta

    from aura.gateway.dispatch import Dispatcher
    from aura.gateway.outbox import relay_once
    from aura.gateway.senders import CelerySender

    unreachable = make_celery_app(Settings(celery_broker_url="amqp://guest:guest@127.0.0.1:1//"))
    unreachable.conf.broker_connection_timeout = 0.5
    unreachable.conf.task_publish_retry = False
    settings = Settings(celery_broker_url=amqp_url, redis_url=redis_url)
    tenant_id, key = await tenant(pg_database)
    await forget_held_rows(pg_database)  # earlier tests' imports are not this test's
    async with gateway_client(pg_database, unreachable, settings) as down:
        made = await down.post(
            f"/v1/tenants/{tenant_id}/products", json=product("OB-1"), headers=key
        )
        imported = await down.post(
            f"/v1/tenants/{tenant_id}/imports",
            content=b'{"title": "A", "variants": [{"sku": "OB-2", "price": 1}]}\n{broken\n',
            headers={**key, "content-type": "application/x-ndjson"},
        )
    # The data and its messages were committed together: the requests succeed.
    assert made.status_code == 201, made.text
    assert imported.status_code == 202, imported.text
    enrich_id = f"enrich-{made.json()['id']}"
    staged = await outbox_ids(pg_database, tenant_id)
    assert enrich_id in staged
    assert len(staged) == 3  # one enrichment, two records

    # The relay leaves messages younger than min_age alone (a request may still send them)...
    assert await relay_once(pg_database, publisher, min_age=3600) == 0
    # ...and sends older ones once the broker is back, deleting each one sent; the
    # import's records are held for the fair dispatcher, which sends them.
    later = datetime.now(UTC) + timedelta(hours=2)
    assert await relay_once(pg_database, publisher, min_age=3600, now=lambda: later) == 1
    dispatcher = Dispatcher(pg_database, CelerySender(publisher), depth=100_000)
    assert await dispatcher.dispatch_once() == 2
    assert await outbox_ids(pg_database, tenant_id) == set()
    _, (args, _, _) = await take_message(amqp_url, REALTIME_QUEUE, enrich_id)
    assert args == [made.json()["id"], tenant_id]
    for record_id in staged - {enrich_id}:
        _, (args, kwargs, _) = await take_message(amqp_url, BULK_QUEUE, record_id)
        assert args[1] == tenant_id
        assert kwargs == {"import_id": imported.json()["import_id"]}


async def test_published_messages_leave_the_outbox(
    client: httpx.AsyncClient, pg_database: Database
) -> None:
    tenant_id, key = await tenant(pg_database)
    made = await client.post(f"/v1/tenants/{tenant_id}/products", json=product("OB-9"), headers=key)
    assert made.status_code == 201

    async def left() -> bool:  # deleted once confirmed, which may come after the answer
        return await outbox_ids(pg_database, tenant_id) == set()

    await wait_until(left, within=10.0)
