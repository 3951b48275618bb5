"""The fair dispatcher (``aura.gateway.dispatch``) on the real PostgreSQL: held rows go out a
fair share per tenant at a time, within the queues' room, each exactly once, whatever the
publishes do and however many dispatchers run."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from aura.contract import BULK_QUEUE, INGEST_TASK, REALTIME_QUEUE
from aura.db import HELD, Database, OutboxMessage, Staged, stage_messages
from aura.gateway import create_tenant_with_key
from aura.gateway.dispatch import Dispatcher
from tests.helpers import forget_held_rows


class Broker:
    """A sender that records what it was given, reports the depths it is told, and fails
    a send when told to (after sending part of it, as a broker cut mid-batch does)."""

    def __init__(self, depths: dict[str, int] | None = None) -> None:
        self.sent: list[Staged] = []
        self.depths = depths if depths is not None else {}
        self.fail_after: int | None = None

    async def send(
        self, messages: Sequence[Staged], *, deadline: float | None = None
    ) -> tuple[list[str], BaseException | None]:
        if self.fail_after is not None:
            taken = list(messages[: self.fail_after])
            self.sent += taken
            return [m.message_id for m in taken], ConnectionError("the broker went away")
        self.sent += messages
        return [m.message_id for m in messages], None

    async def depth(self, queue: str) -> int:
        return self.depths.get(queue, 0)

    async def close(self) -> None:
        return None


async def tenants(database: Database, count: int) -> list[uuid.UUID]:
    made = []
    async with database.session() as session:
        for _ in range(count):
            tenant, _key = await create_tenant_with_key(session, f"d-{uuid.uuid4().hex[:10]}")
            made.append(tenant.id)
        await session.commit()
    return made


async def hold(database: Database, tenant: uuid.UUID, count: int, queue: str = BULK_QUEUE) -> None:
    rows = [
        Staged(str(uuid.uuid4()), tenant, INGEST_TASK, queue, ["{}", str(tenant)])
        for _ in range(count)
    ]
    async with database.session() as session:
        await stage_messages(session, rows, HELD)
        await session.commit()


async def held(database: Database, owners: Sequence[uuid.UUID]) -> int:
    async with database.session() as session:
        found = await session.scalar(
            select(func.count())
            .select_from(OutboxMessage)
            .where(OutboxMessage.tenant_id.in_(owners))
        )
    return int(found or 0)


async def test_a_small_tenant_goes_out_whole_in_the_first_round(pg_database: Database) -> None:
    await forget_held_rows(pg_database)
    big, small = await tenants(pg_database, 2)
    await hold(pg_database, big, 300)
    await hold(pg_database, small, 10)
    broker = Broker()
    dispatcher = Dispatcher(pg_database, broker, depth=50)
    assert await dispatcher.dispatch_once() == 50
    by_tenant = Counter(m.tenant_id for m in broker.sent)
    assert by_tenant == {small: 10, big: 40}
    first_twenty = Counter(m.tenant_id for m in broker.sent[:20])
    assert first_twenty == {small: 10, big: 10}  # interleaved: the batch goes out together
    assert await held(pg_database, [big, small]) == 260


async def test_a_full_queue_or_the_queue_it_feeds_holds_everything(pg_database: Database) -> None:
    await forget_held_rows(pg_database)
    (tenant,) = await tenants(pg_database, 1)
    await hold(pg_database, tenant, 100)
    broker = Broker({BULK_QUEUE: 50})
    dispatcher = Dispatcher(pg_database, broker, depth=50, feeds={BULK_QUEUE: REALTIME_QUEUE})
    assert await dispatcher.dispatch_once() == 0  # bulk_queue is as deep as it may be
    broker.depths = {BULK_QUEUE: 0, REALTIME_QUEUE: 45}
    assert await dispatcher.dispatch_once() == 5  # enrichments are waiting: ingests wait
    broker.depths = {}
    assert await dispatcher.dispatch_once() == 50
    assert dispatcher.depth_for(BULK_QUEUE) == 50  # 55 in 3 s: below the floor


async def test_a_failed_publish_puts_what_it_did_not_send_back_on_hold(
    pg_database: Database,
) -> None:
    await forget_held_rows(pg_database)
    (tenant,) = await tenants(pg_database, 1)
    await hold(pg_database, tenant, 30)
    broker = Broker()
    broker.fail_after = 10
    dispatcher = Dispatcher(pg_database, broker, depth=50)
    assert await dispatcher.dispatch_once() == 10
    async with pg_database.session() as session:
        owners = set(
            await session.scalars(
                select(OutboxMessage.claimed_by).where(OutboxMessage.tenant_id == tenant)
            )
        )
    assert owners == {HELD.owner}  # the rest: held again for a fair round, not the relay's
    broker.fail_after = None
    assert await dispatcher.dispatch_once() == 20
    assert len({m.message_id for m in broker.sent}) == 30


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    sizes=st.lists(st.integers(1, 60), min_size=1, max_size=4),
    depth=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_every_held_row_goes_out_once_whatever_fails_and_however_many_dispatch(
    pg_url: str, sizes: list[int], depth: int, seed: int
) -> None:
    """Three dispatchers at once, their publishes failing at random part-way: every held
    row is sent (and deleted) exactly once in the end; none is lost, none doubled."""
    rng = random.Random(seed)

    async def main() -> None:
        database = Database(pg_url, pool_size=4, max_overflow=2)  # this loop's own pool
        try:
            await run(database)
        finally:
            await database.dispose()

    async def run(database: Database) -> None:
        await forget_held_rows(database)
        owners = await tenants(database, len(sizes))
        for owner, size in zip(owners, sizes, strict=True):
            await hold(database, owner, size)
        brokers = [Broker() for _ in range(3)]
        dispatchers = [Dispatcher(database, b, depth=depth) for b in brokers]
        for _ in range(400):
            for broker in brokers:
                broker.fail_after = rng.choice([None, None, 0, 1, depth // 2])
            await asyncio.gather(*(d.dispatch_once() for d in dispatchers))
            if not await held(database, owners):
                break
        assert await held(database, owners) == 0
        confirmed = Counter(m.message_id for b in brokers for m in b.sent)
        assert sum(confirmed.values()) == sum(sizes)  # each once: no row twice
        assert len(confirmed) == sum(sizes)

    asyncio.run(main())


async def test_a_database_failure_after_the_send_puts_the_rows_back_on_hold(
    pg_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sent, then the DELETE failed (the database went away): the next round puts them
    back on hold and sends them again (the inbox absorbs the twin), instead of leaving
    them claimed until the relay's lease runs out (seen in ``aura chaos db-kill``)."""
    from aura.gateway import relay

    await forget_held_rows(pg_database)
    (tenant,) = await tenants(pg_database, 1)
    await hold(pg_database, tenant, 20)
    real, failures = relay.clear_outbox, [ConnectionError("the database went away")]

    async def clear_once_failing(session: object, ids: object) -> None:
        if failures:
            raise failures.pop()
        await real(session, ids)  # type: ignore[arg-type]

    monkeypatch.setattr(relay, "clear_outbox", clear_once_failing)
    broker = Broker()
    dispatcher = Dispatcher(pg_database, broker, depth=50)
    with pytest.raises(ConnectionError):
        await dispatcher.dispatch_once()
    assert await dispatcher.dispatch_once() == 20
    assert await held(pg_database, [tenant]) == 0
    assert Counter(Counter(m.message_id for m in broker.sent).values()) == {2: 20}
