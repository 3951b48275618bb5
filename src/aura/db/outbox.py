"""The transactional outbox: a message is committed with the change that needs it.

The gateway writes a product (or an import's records) and the messages that must follow
in one transaction, publishes them after the commit, and deletes each once the broker has
confirmed it. A broker outage or a crash between commit and publish leaves the rows here,
and the relay (``aura.gateway.outbox``) publishes them later. Publishing twice is safe:
the worker's inbox makes each message's effect happen once.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from aura.db.models import OutboxMessage

__all__ = ["Staged", "clear_outbox", "due_messages", "stage_messages"]

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


async def stage_messages(session: AsyncSession, messages: Sequence[Staged]) -> None:
    """Add ``messages`` to the outbox, in the caller's transaction."""
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
        }
        for m in messages
    ]
    for start in range(0, len(rows), _CHUNK):
        await session.execute(insert(OutboxMessage), rows[start : start + _CHUNK])


async def clear_outbox(session: AsyncSession, message_ids: Iterable[str]) -> None:
    """Delete published messages (in the caller's transaction)."""
    ids = list(message_ids)
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        await session.execute(delete(OutboxMessage).where(OutboxMessage.message_id.in_(chunk)))


async def due_messages(session: AsyncSession, *, before: datetime, limit: int) -> list[Staged]:
    """The oldest ``limit`` messages staged before ``before`` and still unpublished."""
    rows = (
        await session.scalars(
            select(OutboxMessage)
            .where(OutboxMessage.created_at < before)
            .order_by(OutboxMessage.created_at, OutboxMessage.message_id)
            .limit(limit)
        )
    ).all()
    return [
        Staged(row.message_id, row.tenant_id, row.task, row.queue, list(row.args), row.kwargs)
        for row in rows
    ]
