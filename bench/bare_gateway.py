"""The baselines for bench/gateway_load.py: bare FastAPI + asyncpg endpoints doing the
same insert as the gateway's POST products (a product and its variant, one transaction),
with no validation beyond pydantic, no auth lookup cache: what the platform costs is
measured against them, in the same run.

    app             the insert alone: no outbox, no publish
    publishing_app  the honest peer: the insert plus an outbox row in the same
                    transaction, then one persistent message published with publisher
                    confirms (aio-pika: one connection and one confirming channel opened at
                    start-up), the answer after the broker's confirm, and the outbox row
                    deleted after it -- what a team would write by hand with no
                    resilience layer: no batching, no relay, no admission control, no
                    retry; a publish that fails leaves its row and still answers 201.

    BARE_DSN=postgresql://... uvicorn bench.bare_gateway:app --port 8001
    BARE_DSN=postgresql://... BARE_BROKER=amqp://guest:guest@127.0.0.1/vhost \
        uvicorn bench.bare_gateway:publishing_app --port 8002

The message is the gateway's: Celery's protocol 2 as JSON (headers, properties and body as
``celery.app.amqp.as_task_v2`` makes them, built by hand here), the enrichment task of
the new product on the realtime queue, routed through the same topic exchange to the
same quorum queue (declared with the work queues' arguments), ``mandatory`` so an
unroutable message is not taken for sent. It uses Aura's outbox table (the database is
migrated by bench/gateway_load.py).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aio_pika
import asyncpg
from fastapi import FastAPI
from pydantic import BaseModel

from aura.contract import ENRICH_TASK, PLATFORM_QUEUES, REALTIME_QUEUE
from aura.messaging.topology import WORK_EXCHANGE, work_queues

_log = logging.getLogger("bare_gateway")


class Variant(BaseModel):
    sku: str
    price: Decimal
    currency: str = "USD"


class Product(BaseModel):
    title: str
    variants: list[Variant]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.pool = await asyncpg.create_pool(os.environ["BARE_DSN"], min_size=5, max_size=50)
    yield
    await app.state.pool.close()


app = FastAPI(lifespan=lifespan)


async def _insert(
    connection: asyncpg.Connection, tenant_id: uuid.UUID, product_id: uuid.UUID, product: Product
) -> datetime:
    now = datetime.now(UTC)
    await connection.execute(
        "insert into products (id, tenant_id, title, created_at) values ($1, $2, $3, $4)",
        product_id,
        tenant_id,
        product.title,
        now,
    )
    await connection.executemany(
        "insert into variants (id, tenant_id, product_id, sku, price, currency, attributes)"
        " values ($1, $2, $3, $4, $5, $6, '{}')",
        [
            (uuid.uuid4(), tenant_id, product_id, v.sku, v.price, v.currency)
            for v in product.variants
        ],
    )
    return now


@app.post("/v1/tenants/{tenant_id}/products", status_code=201)
async def create(tenant_id: uuid.UUID, product: Product) -> dict[str, str]:
    product_id = uuid.uuid4()
    async with app.state.pool.acquire() as connection, connection.transaction():
        await _insert(connection, tenant_id, product_id, product)
    return {"id": str(product_id)}


# --- the honest peer: the same insert, its outbox row, a confirmed publish ---------------

_ORIGIN = f"gen{os.getpid()}@{socket.gethostname()}"
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def _celery_message(message_id: str, task: str, args: list[Any], tenant_id: uuid.UUID) -> Any:
    """Celery's protocol 2, JSON, as ``as_task_v2`` and kombu make it."""
    headers: dict[str, Any] = {
        "lang": "py",
        "task": task,
        "id": message_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": message_id,
        "parent_id": None,
        "argsrepr": repr(args),
        "kwargsrepr": "{}",
        "origin": _ORIGIN,
        "ignore_result": None,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
        "aura_tenant": str(tenant_id),
    }
    return aio_pika.Message(
        body=json.dumps([args, {}, _EMBED]).encode(),
        headers=headers,
        content_type="application/json",
        content_encoding="utf-8",
        correlation_id=message_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=0,
    )


@asynccontextmanager
async def publishing_lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.pool = await asyncpg.create_pool(os.environ["BARE_DSN"], min_size=5, max_size=50)
    connection = await aio_pika.connect(os.environ["BARE_BROKER"])
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    exchange = await channel.declare_exchange(
        WORK_EXCHANGE.name, aio_pika.ExchangeType.TOPIC, durable=True
    )
    for queue in work_queues(PLATFORM_QUEUES):  # as the workers (and the gateway) declare them
        declared = await channel.declare_queue(
            queue.name, durable=True, arguments=getattr(queue, "queue_arguments", None)
        )
        await declared.bind(exchange, routing_key=queue.routing_key)
    app.state.exchange = exchange
    yield
    await connection.close()
    await app.state.pool.close()


publishing_app = FastAPI(lifespan=publishing_lifespan)


@publishing_app.post("/v1/tenants/{tenant_id}/products", status_code=201)
async def create_and_publish(tenant_id: uuid.UUID, product: Product) -> dict[str, str]:
    state = publishing_app.state
    product_id = uuid.uuid4()
    message_id = f"enrich-{product_id}"
    args = [str(product_id), str(tenant_id)]
    async with state.pool.acquire() as connection, connection.transaction():
        now = await _insert(connection, tenant_id, product_id, product)
        await connection.execute(
            "insert into outbox (message_id, tenant_id, task, queue, args, kwargs, created_at)"
            " values ($1, $2, $3, $4, $5::json, '{}', $6)",
            message_id,
            tenant_id,
            ENRICH_TASK,
            REALTIME_QUEUE,
            json.dumps(args),
            now,
        )
    # Committed: the answer is 201 whatever the publish does (a failed one leaves the row).
    try:
        await state.exchange.publish(
            _celery_message(message_id, ENRICH_TASK, args, tenant_id),
            routing_key=REALTIME_QUEUE,
            timeout=30,
        )  # returns once the broker confirmed it (raises on a nack or a return)
    except Exception as exc:
        _log.warning("publish failed, left in the outbox: %r", exc)
        return {"id": str(product_id)}
    await state.pool.execute("delete from outbox where message_id = $1", message_id)
    return {"id": str(product_id)}
