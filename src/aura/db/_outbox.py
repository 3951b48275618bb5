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

from sqlalchemy import delete, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from aura.db._engine import Database
from aura.db._models import OutboxMessage
from aura.db._statement import execute_atomically

__all__ = [
    "Claim",
    "Staged",
    "claim_due",
    "clear_outbox",
    "delete_sent",
    "extend_claim",
    "release_claim",
    "renew_claim",
    "stage_messages",
    "take_held",
]

_CHUNK = 1000


@dataclass(frozen=True)
class Staged:
    """One message to publish: Celery's task name, queue, arguments and id."""

    message_id: str
    tenant_id: uuid.UUID
    task: str
    queue: str
    args: list[Any]
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Claim:
    """Who publishes a set of rows (a random token) and until when."""

    owner: str
    until: datetime

    @classmethod
    def new(cls, lease: float, now: datetime | None = None) -> Claim:
        return cls(uuid.uuid4().hex, (now or datetime.now(UTC)) + timedelta(seconds=lease))


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
    return Staged(row.message_id, row.tenant_id, row.task, row.queue, list(row.args), row.kwargs)


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
