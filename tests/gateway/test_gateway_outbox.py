"""The outbox on real PostgreSQL and RabbitMQ: one publisher per row at a time.

Publishes are counted at the publisher (every ``send_task`` the gateway and the relay
make), so a row sent twice is seen even though the worker's inbox would hide it.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import structlog
from celery import Celery
from kombu.connection import Connection
from sqlalchemy import func, select

from aura.catalog import ImportRecord
from aura.config import Settings
from aura.contract import BULK_QUEUE, PLATFORM_QUEUES
from aura.db import Claim, Database, OutboxMessage, Staged, stage_messages
from aura.gateway import Gateway, create_app, create_tenant_with_key
from aura.gateway.outbox import publish_claimed, publish_stored, relay_forever, relay_once
from aura.messaging.topology import work_queues
from aura.worker.celery_app import make_celery_app
from tests.helpers import FakeClock, wait_until


class CountingPublisher:
    """The real Celery publisher, counting every message id it is asked to send."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.sent: Counter[str] = Counter()
        self.times: list[float] = []
        self._lock = threading.Lock()

    def send_task(self, name: str, **options: Any) -> Any:
        result = self.app.send_task(name, **options)
        with self._lock:
            self.sent[options["task_id"]] += 1
            self.times.append(time.monotonic())
        return result


@pytest.fixture(scope="module")
def celery_publisher(amqp_url: str) -> Iterator[Celery]:
    yield make_celery_app(Settings(celery_broker_url=amqp_url))
    # Thousands of messages no worker will take: leave the queues as other tests expect.
    with Connection(amqp_url) as connection:
        channel = connection.channel()
        for queue in work_queues(PLATFORM_QUEUES):
            bound = queue(channel)
            bound.declare()  # as the topology defines it
            bound.purge()
        channel.close()


async def new_tenant(database: Database) -> tuple[uuid.UUID, dict[str, str]]:
    async with database.session() as session:
        created, key = await create_tenant_with_key(session, f"ob-{uuid.uuid4().hex[:10]}")
        await session.commit()
    return created.id, {"X-API-Key": key}


async def left_in_outbox(database: Database, tenant_id: uuid.UUID) -> int:
    async with database.session() as session:
        count = await session.scalar(
            select(func.count())
            .select_from(OutboxMessage)
            .where(OutboxMessage.tenant_id == tenant_id)
        )
    return int(count or 0)


def record(i: int) -> str:
    return f'{{"title": "R{i}", "variants": [{{"sku": "R-{i}", "price": 1}}]}}'


@pytest.fixture
async def relay(
    pg_database: Database, celery_publisher: Celery
) -> AsyncIterator[CountingPublisher]:
    """The gateway's relay with OUTBOX_RELAY_MIN_AGE=1, looking every 50 ms."""
    counting = CountingPublisher(celery_publisher)
    task = asyncio.create_task(
        relay_forever(pg_database, counting, interval=0.05, min_age=1)  # type: ignore[arg-type]
    )
    yield counting
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.timeout(180)
async def test_a_1500_record_import_is_published_once_with_min_age_1(
    pg_database: Database, relay: CountingPublisher
) -> None:
    """Large (past 500 records: read back from the outbox): staged in 2 parts of 1000, sent
    in 3 of 500, for longer than min_age (past two leases: the next test, on its clock)."""
    tenant_id, key = await new_tenant(pg_database)
    gateway = Gateway(pg_database, relay, {}, outbox_lease=1.0)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=create_app(gateway))
    body = "\n".join(record(i) for i in range(1500)).encode()
    with structlog.testing.capture_logs() as logged:
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            response = await client.post(
                f"/v1/tenants/{tenant_id}/imports",
                content=body,
                headers={**key, "content-type": "application/x-ndjson"},
                timeout=120,
            )
        assert response.status_code == 202, response.text

        async def drained() -> bool:
            return await left_in_outbox(pg_database, tenant_id) == 0

        await wait_until(drained, within=60, interval=0.1)
    query = select(ImportRecord.message_id).where(ImportRecord.tenant_id == tenant_id)
    async with pg_database.session() as session:
        ids = set((await session.scalars(query)).all())
    assert len(ids) == 1500
    mine = {m: n for m, n in relay.sent.items() if m in ids}
    assert set(mine) == ids  # every message published...
    assert [m for m, n in mine.items() if n > 1] == []  # ...once
    # The scenario of the bug: publishing took longer than the relay's minimum age, and
    # the relay looked all along (it would have taken rows no one held).
    assert relay.times[-1] - relay.times[0] > 1.0, "publishing was too quick to test the lease"
    took_over = [e for e in logged if "relay took over" in e["event"]]
    assert took_over == [], [e for e in logged if e["log_level"] != "debug"]


async def stage(
    database: Database, tenant_id: uuid.UUID, count: int, claim: Claim | None
) -> list[Staged]:
    staged = [
        Staged(str(uuid.uuid4()), tenant_id, "aura.ingest_product", BULK_QUEUE, [record(i), "t"])
        for i in range(count)
    ]
    async with database.session() as session:
        await stage_messages(session, staged, claim)
        await session.commit()
    return staged


async def test_a_large_imports_publish_keeps_its_rows_past_two_leases(
    pg_database: Database, celery_publisher: Celery
) -> None:
    """``publish_stored`` on the test's clock: 5 parts of 500, 4 s a send, a 10 s lease. The
    relay looks after each send (same clock): the claim renewed, it finds no row due."""
    tenant_id, _ = await new_tenant(pg_database)
    clock, start, relay = FakeClock(0.0), datetime.now(UTC), CountingPublisher(celery_publisher)
    claim = Claim.new(60, start)  # as a large import stages its rows (STAGED_HOLD)
    ids = [m.message_id for m in await stage(pg_database, tenant_id, 2500, claim)]
    sent: Counter[str] = Counter()

    def now() -> datetime:
        return start + timedelta(seconds=clock())

    class SlowBroker:
        async def send(self, messages: Any, *, deadline: float | None = None) -> Any:
            clock.advance(4.0)  # under the deadline: half the lease
            await relay_once(pg_database, relay, min_age=1, now=now)  # type: ignore[arg-type]
            sent.update(m.message_id for m in messages)
            return [m.message_id for m in messages], None

    published = await publish_stored(pg_database, SlowBroker(), ids, claim, lease=10.0,
                                     origin="import", now=now, clock=clock)  # fmt: skip
    assert (published, clock()) == (2500, 20.0)  # past two leases
    assert sent == Counter(ids)  # each sent once
    assert [m for m in relay.sent if m in sent] == []  # the relay took none of them
    assert await left_in_outbox(pg_database, tenant_id) == 0


async def test_a_crashed_publishers_lease_runs_out_and_the_relay_takes_over(
    pg_database: Database, celery_publisher: Celery
) -> None:
    tenant_id, _ = await new_tenant(pg_database)
    counting = CountingPublisher(celery_publisher)
    start = datetime.now(UTC)
    staged = await stage(pg_database, tenant_id, 20, Claim.new(1.0, start))  # then "crashes"
    far_past = start - timedelta(hours=1)
    # Old enough, but its publisher's lease is live: the relay leaves it alone.
    assert await relay_once(pg_database, counting, min_age=0, now=lambda: start) == 0  # type: ignore[arg-type]
    assert await left_in_outbox(pg_database, tenant_id) == 20
    later = start + timedelta(seconds=2)
    with structlog.testing.capture_logs() as logged:
        sent = await relay_once(pg_database, counting, min_age=1, now=lambda: later)  # type: ignore[arg-type]
    assert sent >= 20
    assert {s.message_id for s in staged} <= set(counting.sent)
    assert max(counting.sent[s.message_id] for s in staged) == 1
    assert await left_in_outbox(pg_database, tenant_id) == 0
    assert any("relay took over" in e["event"] for e in logged)
    assert far_past < start  # (the clock is injected: nothing here waited for the lease)


async def test_a_publisher_whose_lease_passed_to_the_relay_sends_nothing(
    pg_database: Database, celery_publisher: Celery
) -> None:
    tenant_id, _ = await new_tenant(pg_database)
    counting = CountingPublisher(celery_publisher)
    start = datetime.now(UTC)
    slow = Claim.new(1.0, start)
    staged = await stage(pg_database, tenant_id, 10, slow)
    later = start + timedelta(seconds=5)
    assert await relay_once(pg_database, counting, min_age=1, now=lambda: later) >= 10  # type: ignore[arg-type]
    with structlog.testing.capture_logs() as logged:
        sent = await publish_claimed(
            pg_database,
            counting,  # type: ignore[arg-type]
            staged,
            slow,
            lease=1.0,
            origin="import",
            now=lambda: later,
        )
    assert sent == 0
    assert max(counting.sent[s.message_id] for s in staged) == 1
    assert any(e.get("messages") == 10 and "lease ran out" in e["event"] for e in logged)


async def test_two_relays_at_once_never_take_the_same_row(
    pg_database: Database, celery_publisher: Celery
) -> None:
    tenant_id, _ = await new_tenant(pg_database)
    counting = CountingPublisher(celery_publisher)
    staged = await stage(pg_database, tenant_id, 1500, None)
    later = datetime.now(UTC) + timedelta(seconds=5)

    async def relay_all() -> int:
        total = 0
        while sent := await relay_once(
            pg_database,
            counting,  # type: ignore[arg-type]
            min_age=1,
            limit=100,
            now=lambda: later,
        ):
            total += sent
        return total

    totals = await asyncio.gather(relay_all(), relay_all(), relay_all())
    assert all(t > 0 for t in totals), totals  # they really ran side by side
    assert {s.message_id for s in staged} <= set(counting.sent)
    assert max(counting.sent[s.message_id] for s in staged) == 1
    assert await left_in_outbox(pg_database, tenant_id) == 0


class GatedSender:
    """A sender that holds every send until the test opens the gate, counting how many
    sends run at once; everything it is given is confirmed."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.running = self.most = 0
        self.sent: Counter[str] = Counter()
        self.closed = False

    async def send(
        self, messages: Any, *, deadline: float | None = None
    ) -> tuple[list[str], BaseException | None]:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.gate.wait()
        finally:
            self.running -= 1
        for m in messages:
            self.sent[m.message_id] += 1
        return [m.message_id for m in messages], None

    async def close(self) -> None:
        self.closed = True


async def test_requests_share_at_most_max_sends_batches_and_each_is_published_once(
    pg_database: Database,
) -> None:
    """However many requests publish at once: at most ``max_sends`` batches are in
    flight, every request's messages are sent once and deleted, and every request
    returns (none is left waiting)."""
    from aura.gateway.outbox import OutboxPublisher

    tenant_id, _ = await new_tenant(pg_database)
    sender = GatedSender()
    publisher = OutboxPublisher(pg_database, sender, lease=30, max_batch=5, max_sends=2)
    requests = []
    for i in range(12):  # each request: its own claim and 3 messages, as a small import
        claim = Claim.new(60)
        staged = await stage(pg_database, tenant_id, 3, claim)
        requests.append(asyncio.create_task(publisher.publish(staged, claim, origin=f"r{i}")))

    async def all_handed_over() -> bool:
        return sender.running == 2 and publisher.backlog == 36

    await wait_until(all_handed_over, within=10)
    assert publisher.congested  # 36 messages wait: more than 4 batches of 5
    sender.gate.set()
    await asyncio.wait_for(asyncio.gather(*requests), 30)
    assert sender.most == 2  # never more than max_sends at once
    assert len(sender.sent) == 36
    assert max(sender.sent.values()) == 1
    assert publisher.backlog == 0

    async def deleted() -> bool:
        return await left_in_outbox(pg_database, tenant_id) == 0

    await wait_until(deleted, within=10)  # deleted after the requests were answered
    await publisher.aclose()
    assert sender.closed


async def test_a_failed_delete_after_the_publish_is_logged_and_left_to_the_relay(
    pg_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aura.gateway import outbox as gateway_outbox
    from aura.gateway.outbox import OutboxPublisher

    tenant_id, _ = await new_tenant(pg_database)
    sender = GatedSender()
    sender.gate.set()

    async def broken_delete(database: Database, ids: Any) -> None:
        raise ConnectionResetError("the database went away")

    monkeypatch.setattr(gateway_outbox, "delete_sent", broken_delete)
    publisher = OutboxPublisher(pg_database, sender, lease=30)
    claim = Claim.new(60)
    staged = await stage(pg_database, tenant_id, 4, claim)
    with structlog.testing.capture_logs() as logged:
        await asyncio.wait_for(publisher.publish(staged, claim, origin="product"), 30)
        await publisher.aclose()  # waits for the delete in flight
    assert len(sender.sent) == 4  # the request was answered as published
    assert await left_in_outbox(pg_database, tenant_id) == 4  # the relay's, later
    assert any("could not delete published messages" in e["event"] for e in logged)
