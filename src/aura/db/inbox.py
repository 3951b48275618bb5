"""The inbox: effects happen once, however often a message is delivered.

A task calls ``claim_message`` inside the same ``@transactional`` function as its effect.
The first delivery inserts the message id (and its payload's fingerprint) and goes on; a
redelivery finds the row and skips the effect. Because the row and the effect commit (or
roll back) together, a crash anywhere -- even a COMMIT whose reply was lost -- leaves
either both or neither, and the next delivery decides correctly. Two deliveries running
at once serialize on the primary key: the second waits for the first's outcome.

The same id with another payload is a conflict, like an idempotency key reused with
another request body: ``claim_message`` raises ``ConflictingMessageIdError`` (the task
dead-letters it as ``conflicting_message_id``), never a silent success. A row written
before fingerprints were kept (NULL) matches any payload.

``DatabaseInbox`` is the read side ``resilient_task(inbox=...)`` uses to settle a
delivery before it runs (``aura.messaging.idempotency``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from sqlalchemy import bindparam, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from aura.db.engine import Database
from aura.db.models import ProcessedMessage
from aura.errors import ConflictingMessageIdError
from aura.message_id import InboxEntry, validate_message_id

__all__ = ["DatabaseInbox", "already_processed", "claim_message"]


async def claim_message(
    session: AsyncSession,
    message_id: str,
    *,
    task: str,
    tenant_id: uuid.UUID | None = None,
    fingerprint: str | None = None,
) -> bool:
    """Record ``message_id`` in this transaction; False if its effect is already
    committed for the same payload; ``ConflictingMessageIdError`` if for another."""
    validate_message_id(message_id)
    dialect = session.get_bind().dialect.name
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    statement = (
        insert(ProcessedMessage)
        .values(message_id=message_id, task=task, tenant_id=tenant_id, fingerprint=fingerprint)
        .on_conflict_do_nothing(index_elements=[ProcessedMessage.message_id])
        .returning(ProcessedMessage.message_id)
    )
    claimed = (await session.execute(statement)).scalar_one_or_none()
    if claimed is not None:
        return True
    stored = await session.scalar(
        select(ProcessedMessage.fingerprint).where(ProcessedMessage.message_id == message_id)
    )
    if fingerprint is not None and stored is not None and stored != fingerprint:
        raise ConflictingMessageIdError(
            f"message id {message_id} was committed for another payload "
            f"(stored {stored}, this one {fingerprint})",
            field="message_id",
        )
    return False


async def already_processed(session: AsyncSession, message_id: str) -> bool:
    """True when the effect of ``message_id`` is committed."""
    validate_message_id(message_id)
    found = await session.scalar(
        select(ProcessedMessage.message_id).where(ProcessedMessage.message_id == message_id)
    )
    return found is not None


_LOOKUP = select(ProcessedMessage.fingerprint).where(
    ProcessedMessage.message_id == bindparam("message_id")
)


class DatabaseInbox:
    """``resilient_task``'s inbox, read from ``processed_messages`` (one primary-key
    lookup per delivery). ``database`` is called on first use, inside the worker
    process's event loop, where the pool must be made."""

    def __init__(self, database: Callable[[], Database]) -> None:
        self._database = database

    async def lookup(self, message_id: str) -> InboxEntry | None:
        validate_message_id(message_id)
        # A Core connection, not an ORM session: this runs before every delivery.
        async with self._database().engine.connect() as connection:
            row = (await connection.execute(_LOOKUP, {"message_id": message_id})).first()
        return None if row is None else InboxEntry(fingerprint=row[0])
