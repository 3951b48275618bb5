"""The transactional outbox: a message is committed with the change that needs it.

The gateway writes a product (or an import's records) and the messages that must follow
in one transaction, publishes them after the commit, and deletes each once the broker has
confirmed it. A broker outage or a crash between commit and publish leaves the rows here,
and the relay (``aura.gateway.outbox``) publishes them later.

One publisher per row at a time: every row carries a claim (``claimed_by``, a token, and
``claimed_until``, a lease). The request stages its rows already claimed, in the same
transaction; whoever publishes first renews its claim on the rows it is about to send
(``renew_claim``), and sends only those it still holds. The relay takes only rows whose
lease has run out (``claim_due``: one UPDATE, ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so
two relays never take the same row). A crashed publisher's lease runs out and the relay
takes over.

Rows held for fair dispatch: a row staged under ``HELD`` (a claim no lease ends) is no
publisher's until a dispatcher takes it with ``claim_held``, a number per tenant at a
time (``aura.gateway.dispatch``: a large import waits here, not in the broker's queue,
so another tenant's work goes out ahead of its backlog). ``held_backlog`` counts them by
queue and tenant. ``claim_due`` never takes them (their lease never runs out).

What can still be published twice, and why it is harmless: a publisher that stalls inside
one send for longer than its remaining lease (it renews every half lease) and a crash after
the broker confirmed a message but before its row was deleted. The worker's inbox makes
each message's effect happen once. Times come from the caller's clock (UTC): publishers on
different hosts must agree on time to within a small part of the lease.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, insert, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from aura import tracing
from aura.db._engine import Database
from aura.db._models import HELD_BY, OutboxMessage
from aura.db._statement import execute_atomically

__all__ = [
    "HELD",
    "Claim",
    "Staged",
    "claim_due",
    "claim_held",
    "clear_outbox",
    "delete_sent",
    "extend_claim",
    "held_backlog",
    "release_claim",
    "renew_claim",
    "stage_messages",
    "take_held",
]

_CHUNK = 1000


@dataclass(frozen=True)
class Staged:
    """One message to publish: Celery's task name, queue, arguments and id, and the trace
    context it was made in (``aura.tracing``: the staging request's span, None when
    tracing is off), stored with its row so that its publish joins that request's trace."""

    message_id: str
    tenant_id: uuid.UUID
    task: str
    queue: str
    args: list[Any]
    kwargs: dict[str, Any] = field(default_factory=dict)
    traceparent: str | None = field(default_factory=tracing.current_traceparent)


@dataclass(frozen=True)
class Claim:
    """Who publishes a set of rows (a random token) and until when."""

    owner: str
    until: datetime

    @classmethod
    def new(cls, lease: float, now: datetime | None = None) -> Claim:
        return cls(uuid.uuid4().hex, (now or datetime.now(UTC)) + timedelta(seconds=lease))


HELD = Claim(HELD_BY, datetime(9999, 12, 31, tzinfo=UTC))


async def held_backlog(
    session: AsyncSession, *, cap: int | None = None
) -> dict[tuple[str, uuid.UUID], int]:
    """How many rows are held for dispatch, by (queue, tenant), each count at most ``cap``.
    On PostgreSQL with a cap: a skip scan of ``ix_outbox_held`` for the pairs and a count
    of at most ``cap`` index entries each (a look costs its tenants and its room, not the
    backlog: counting 20,000 held rows took 31 ms, four times a second per gateway)."""
    if cap is not None and session.get_bind().dialect.name == "postgresql":
        rows = await session.execute(_HELD_PAIRS, {"held": HELD.owner, "cap": cap})
        return {(queue, tenant): int(count) for queue, tenant, count in rows.all()}
    rows = await session.execute(
        select(OutboxMessage.queue, OutboxMessage.tenant_id, func.count())
        .where(OutboxMessage.claimed_by == HELD.owner)
        .group_by(OutboxMessage.queue, OutboxMessage.tenant_id)
    )
    return {
        (queue, tenant): int(count) if cap is None else min(int(count), cap)
        for queue, tenant, count in rows.all()
    }


_HELD_PAIRS = text("""
    WITH RECURSIVE pairs(queue, tenant_id) AS (
        (SELECT queue, tenant_id FROM outbox WHERE claimed_by = :held
         ORDER BY queue, tenant_id LIMIT 1)
        UNION ALL
        SELECT next.queue, next.tenant_id FROM pairs p CROSS JOIN LATERAL (
            SELECT o.queue, o.tenant_id FROM outbox o
            WHERE o.claimed_by = :held AND (o.queue, o.tenant_id) > (p.queue, p.tenant_id)
            ORDER BY o.queue, o.tenant_id LIMIT 1) next
    )
    SELECT p.queue, p.tenant_id, (
        SELECT count(*) FROM (
            SELECT 1 FROM outbox o
            WHERE o.claimed_by = :held AND o.queue = p.queue AND o.tenant_id = p.tenant_id
            LIMIT :cap) counted)
    FROM pairs p
""")


async def claim_held(
    session: AsyncSession, claim: Claim, quotas: dict[tuple[str, uuid.UUID], int]
) -> list[Staged]:
    """Claim (in the caller's transaction) up to ``quotas[(queue, tenant)]`` of each
    tenant's oldest held rows on that queue; returns them interleaved across tenants (each
    tenant's oldest first), so a batch sends every tenant's share together. Two
    dispatchers never take the same row (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, one
    statement reading ``ix_outbox_held``)."""
    wanted = {key: count for key, count in quotas.items() if count > 0}
    if not wanted:
        return []
    if session.get_bind().dialect.name == "postgresql":
        result = await session.execute(
            _CLAIM_HELD,
            {
                "queues": [queue for queue, _ in wanted],
                "tenants": [tenant for _, tenant in wanted],
                "counts": list(wanted.values()),
                "held": HELD.owner,
                "owner": claim.owner,
                "until": claim.until,
            },
        )
        return _interleaved(result.all())
    ids: list[str] = []
    for (queue, tenant), count in wanted.items():
        ids += (
            await session.scalars(
                select(OutboxMessage.message_id)
                .where(
                    OutboxMessage.claimed_by == HELD.owner,
                    OutboxMessage.queue == queue,
                    OutboxMessage.tenant_id == tenant,
                )
                .order_by(OutboxMessage.created_at, OutboxMessage.message_id)
                .limit(count)
            )
        ).all()
    rows: list[Any] = []
    for start in range(0, len(ids), _CHUNK):
        rows += (
            await session.execute(
                update(OutboxMessage)
                .where(
                    OutboxMessage.message_id.in_(ids[start : start + _CHUNK]),
                    OutboxMessage.claimed_by == HELD.owner,
                )
                .values(claimed_by=claim.owner, claimed_until=claim.until)
                .returning(*_COLUMNS),
                execution_options={"synchronize_session": False},
            )
        ).all()
    return _interleaved(rows)


_COLUMNS = (
    OutboxMessage.message_id,
    OutboxMessage.tenant_id,
    OutboxMessage.task,
    OutboxMessage.queue,
    OutboxMessage.args,
    OutboxMessage.kwargs,
    OutboxMessage.created_at,
    OutboxMessage.traceparent,
)
_CLAIM_HELD = text("""
    WITH picked AS MATERIALIZED (  -- once: a subquery under IN may run again per row
        SELECT chosen.message_id
        FROM unnest(CAST(:queues AS varchar[]), CAST(:tenants AS uuid[]),
                    CAST(:counts AS int[])) AS wanted(queue, tenant_id, n)
        CROSS JOIN LATERAL (
            SELECT o.message_id FROM outbox o
            WHERE o.claimed_by = :held AND o.queue = wanted.queue
              AND o.tenant_id = wanted.tenant_id
            ORDER BY o.created_at, o.message_id
            LIMIT wanted.n
            FOR UPDATE SKIP LOCKED) chosen)
    UPDATE outbox SET claimed_by = :owner, claimed_until = :until
    FROM picked
    WHERE outbox.message_id = picked.message_id AND outbox.claimed_by = :held
    RETURNING outbox.message_id, outbox.tenant_id, outbox.task, outbox.queue, outbox.args,
              outbox.kwargs, outbox.created_at, outbox.traceparent
""").columns(*_COLUMNS)


def _interleaved(rows: Sequence[Any]) -> list[Staged]:
    """Round robin over tenants, each tenant's rows oldest first."""
    by_tenant: dict[uuid.UUID, list[Any]] = {}
    for row in sorted(rows, key=lambda r: (r.created_at, r.message_id)):
        by_tenant.setdefault(row.tenant_id, []).append(row)
    ranked = [
        (rank, i, row) for i, rs in enumerate(by_tenant.values()) for rank, row in enumerate(rs)
    ]
    ordered = sorted(ranked, key=lambda x: (x[0], x[1]))
    return [
        Staged(r.message_id, r.tenant_id, r.task, r.queue, list(r.args), r.kwargs, r.traceparent)
        for _, _, r in ordered
    ]


async def stage_messages(
    session: AsyncSession, messages: Sequence[Staged], claim: Claim | None = None
) -> None:
    """Add ``messages`` to the outbox, in the caller's transaction, held by ``claim`` (a
    row staged without one is the relay's at once)."""
    now = datetime.now(UTC)
    rows = [
        {
            "message_id": m.message_id,
            "tenant_id": m.tenant_id,
            "task": m.task,
            "queue": m.queue,
            "args": m.args,
            "kwargs": m.kwargs,
            "created_at": now,
            "claimed_by": claim.owner if claim else None,
            "claimed_until": claim.until if claim else None,
            "traceparent": m.traceparent,
        }
        for m in messages
    ]
    for start in range(0, len(rows), _CHUNK):
        await session.execute(insert(OutboxMessage), rows[start : start + _CHUNK])


async def delete_sent(database: Database, message_ids: Sequence[str]) -> None:
    """Delete published messages, in one autocommit statement on PostgreSQL (one round
    trip: ``execute_atomically``), in a transaction of their own elsewhere."""
    if not message_ids:
        return
    if database.dialect != "postgresql":
        async with database.session() as session:
            await clear_outbox(session, message_ids)
            await session.commit()
        return
    for start in range(0, len(message_ids), _CHUNK):
        chunk = list(message_ids[start : start + _CHUNK])
        await execute_atomically(database, "delete_sent", _DELETE_SENT, chunk)


_DELETE_SENT = "delete from outbox where message_id = any($1::varchar[])"


async def clear_outbox(session: AsyncSession, message_ids: Iterable[str]) -> None:
    """Delete published messages (in the caller's transaction)."""
    ids = list(message_ids)
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        await session.execute(delete(OutboxMessage).where(OutboxMessage.message_id.in_(chunk)))


def _staged(row: OutboxMessage) -> Staged:
    return Staged(
        row.message_id,
        row.tenant_id,
        row.task,
        row.queue,
        list(row.args),
        row.kwargs,
        row.traceparent,
    )


async def claim_due(
    session: AsyncSession, claim: Claim, *, now: datetime, staged_before: datetime, limit: int
) -> list[Staged]:
    """Claim (in the caller's transaction) up to ``limit`` of the oldest rows staged before
    ``staged_before`` that no one holds at ``now``; returns them oldest first."""
    free = or_(OutboxMessage.claimed_until.is_(None), OutboxMessage.claimed_until <= now)
    due = (
        select(OutboxMessage.message_id)
        .where(OutboxMessage.created_at < staged_before, free)
        .order_by(OutboxMessage.created_at, OutboxMessage.message_id)
        .limit(limit)
        .with_for_update(skip_locked=True)  # PostgreSQL; SQLite has one writer at a time
    )
    rows = (
        await session.scalars(
            update(OutboxMessage)
            .where(OutboxMessage.message_id.in_(due), free)
            .values(claimed_by=claim.owner, claimed_until=claim.until)
            .returning(OutboxMessage),
            execution_options={"synchronize_session": False},
        )
    ).all()
    return [_staged(row) for row in sorted(rows, key=lambda r: (r.created_at, r.message_id))]


async def renew_claim(
    session: AsyncSession, claim: Claim, message_ids: Sequence[str], *, now: datetime
) -> set[str]:
    """Extend ``claim`` to ``claim.until`` on those of ``message_ids`` it still holds at
    ``now`` (in the caller's transaction); returns them. A row missing from the answer was
    published and deleted, or its lease ran out: it is not this publisher's to send."""
    held: set[str] = set()
    for start in range(0, len(message_ids), _CHUNK):
        chunk = message_ids[start : start + _CHUNK]
        held.update(
            (
                await session.scalars(
                    update(OutboxMessage)
                    .where(
                        OutboxMessage.message_id.in_(chunk),
                        OutboxMessage.claimed_by == claim.owner,
                        OutboxMessage.claimed_until > now,
                    )
                    .values(claimed_until=claim.until)
                    .returning(OutboxMessage.message_id),
                    execution_options={"synchronize_session": False},
                )
            ).all()
        )
    return held


async def take_held(
    session: AsyncSession, claim: Claim, message_ids: Sequence[str], *, now: datetime
) -> list[Staged]:
    """``renew_claim`` that also reads the rows it renewed (in the order of
    ``message_ids``): a publisher that keeps only the ids of a large import loads each part
    as it sends it."""
    rows = (
        await session.scalars(
            update(OutboxMessage)
            .where(
                OutboxMessage.message_id.in_(message_ids),
                OutboxMessage.claimed_by == claim.owner,
                OutboxMessage.claimed_until > now,
            )
            .values(claimed_until=claim.until)
            .returning(OutboxMessage),
            execution_options={"synchronize_session": False},
        )
    ).all()
    order = {message_id: i for i, message_id in enumerate(message_ids)}
    return [_staged(row) for row in sorted(rows, key=lambda r: order[r.message_id])]


async def extend_claim(session: AsyncSession, claim: Claim, *, now: datetime) -> int:
    """Extend to ``claim.until`` every row ``claim.owner`` still holds at ``now`` (in the
    caller's transaction); returns how many. One statement for a whole import, so a
    publisher of 100,000 messages keeps them all while it sends them a part at a time."""
    result = await session.execute(
        update(OutboxMessage)
        .where(OutboxMessage.claimed_by == claim.owner, OutboxMessage.claimed_until > now)
        .values(claimed_until=claim.until),
        execution_options={"synchronize_session": False},
    )
    return int(getattr(result, "rowcount", 0) or 0)


async def release_claim(session: AsyncSession, owner: str, *, now: datetime) -> None:
    """Give up every row ``owner`` still holds (in the caller's transaction)."""
    await session.execute(
        update(OutboxMessage)
        .where(OutboxMessage.claimed_by == owner, OutboxMessage.claimed_until > now)
        .values(claimed_until=now),
        execution_options={"synchronize_session": False},
    )
