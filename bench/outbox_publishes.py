"""How many times each outbox message is published: a 5,000-record import through the
gateway while the relay runs with OUTBOX_RELAY_MIN_AGE=1 (the case where a request's own
publish outlasts the relay's minimum age). Counts every send_task at the publisher.

    python bench/outbox_publishes.py --database-url postgresql+asyncpg://postgres@127.0.0.1/x \
        --broker-url amqp://guest:guest@127.0.0.1:5672/vhost [--records 5000]

Needs an empty, migrated database and a vhost of its own (it purges the work queues).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
import uuid
from collections import Counter
from typing import Any

import httpx
from kombu.connection import Connection
from sqlalchemy import func, select

from aura.catalog import ImportRecord, upgrade
from aura.config import Settings
from aura.contract import PLATFORM_QUEUES
from aura.db import Database, OutboxMessage
from aura.gateway import Gateway, create_app, create_tenant_with_key
from aura.gateway.outbox import relay_forever
from aura.messaging.topology import work_queues
from aura.worker.celery_app import make_celery_app


class CountingPublisher:
    def __init__(self, app: Any) -> None:
        self.app, self.sent, self._lock = app, Counter[str](), threading.Lock()

    def send_task(self, name: str, **options: Any) -> Any:
        result = self.app.send_task(name, **options)
        with self._lock:
            self.sent[options["task_id"]] += 1
        return result


async def run(database_url: str, broker_url: str, records: int) -> None:
    database = Database(database_url, pool_size=5)
    await upgrade(database)
    counting = CountingPublisher(make_celery_app(Settings(celery_broker_url=broker_url)))
    try:
        gateway = Gateway(database, counting, {}, outbox_lease=1.0)  # type: ignore[arg-type, call-arg]
    except TypeError:  # before issue 13: no leases
        gateway = Gateway(database, counting, {})  # type: ignore[arg-type]
    async with database.session() as session:
        tenant, key = await create_tenant_with_key(session, f"bench-{uuid.uuid4().hex[:8]}")
        await session.commit()
    relay = asyncio.create_task(relay_forever(database, counting, interval=0.05, min_age=1))  # type: ignore[arg-type]
    body = "\n".join(
        f'{{"title": "R{i}", "variants": [{{"sku": "R-{i}", "price": 1}}]}}' for i in range(records)
    ).encode()
    started = time.monotonic()
    transport = httpx.ASGITransport(app=create_app(gateway))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        response = await client.post(
            f"/v1/tenants/{tenant.id}/imports",
            content=body,
            headers={"X-API-Key": key, "content-type": "application/x-ndjson"},
            timeout=600,
        )
    answered = time.monotonic() - started
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        async with database.session() as session:
            left = await session.scalar(select(func.count()).select_from(OutboxMessage))
        if not left:
            break
        await asyncio.sleep(0.2)
    relay.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await relay
    async with database.session() as session:
        ids = set(
            (
                await session.scalars(
                    select(ImportRecord.message_id).where(ImportRecord.tenant_id == tenant.id)
                )
            ).all()
        )
    counts = [counting.sent[i] for i in ids]
    print(
        f"import answered {response.status_code} in {answered:.1f}s; records {len(ids)}; "
        f"publishes {sum(counts)}; published once {counts.count(1)}; "
        f"twice or more {sum(1 for c in counts if c > 1)}; never {counts.count(0)}; "
        f"outbox drained after {time.monotonic() - started:.1f}s"
    )
    await database.dispose()
    with Connection(broker_url) as connection:
        channel = connection.channel()
        for queue in work_queues(PLATFORM_QUEUES):
            bound = queue(channel)
            bound.declare()
            bound.purge()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--broker-url", required=True)
    parser.add_argument("--records", type=int, default=5000)
    options = parser.parse_args()
    asyncio.run(run(options.database_url, options.broker_url, options.records))


if __name__ == "__main__":
    main()
