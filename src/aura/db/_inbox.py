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

``claim_message`` takes an ORM session or a Core connection (``engine.connect()``): a task
whose effect is Core statements saves the ORM's per-statement work by using the latter.
Its statements are built once, with bind parameters, so a claim costs one cache lookup
and one round trip (two when the id is already there).

``DatabaseInbox`` is the read side ``resilient_task(inbox=...)`` uses to settle a
delivery before it runs (``aura.messaging._idempotency``): one primary-key read on an
autocommit connection, one round trip (no BEGIN and ROLLBACK around it).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from aura.db._engine import Database
from aura.db._models import ProcessedMessage
from aura.db._statement import fetch_row
from aura.errors import ConflictingMessageIdError
from aura.message_id import InboxEntry, validate_message_id

__all__ = ["DatabaseInbox", "already_processed", "claim_message"]


_TABLE: Any = ProcessedMessage.__table__  # Core statements: no ORM bulk-insert path


def _claim(insert: Any) -> Any:
    return (
        insert(_TABLE)
        .values(
            message_id=bindparam("message_id"),
            task=bindparam("task"),
            tenant_id=bindparam("tenant_id"),
            fingerprint=bindparam("fingerprint"),
            processed_at=bindparam("processed_at"),
        )
        .on_conflict_do_nothing(index_elements=[_TABLE.c.message_id])
        .returning(_TABLE.c.message_id)
    )


_CLAIM = {"postgresql": _claim(postgresql_insert), "sqlite": _claim(sqlite_insert)}
_LOOKUP = select(_TABLE.c.fingerprint).where(_TABLE.c.message_id == bindparam("message_id"))
_LOOKUP_SQL = "SELECT fingerprint FROM processed_messages WHERE message_id = $1"


def _dialect_name(executor: AsyncSession | AsyncConnection) -> str:
    if isinstance(executor, AsyncConnection):
        return executor.dialect.name
    return executor.get_bind().dialect.name


async def claim_message(
    session: AsyncSession | AsyncConnection,
    message_id: str,
    *,
    task: str,
    tenant_id: uuid.UUID | None = None,
    fingerprint: str | None = None,
) -> bool:
    """Record ``message_id`` in this transaction (of an ORM session or a Core
    connection); False if its effect is already committed for the same payload;
    ``ConflictingMessageIdError`` if for another."""
    validate_message_id(message_id)
    parameters = {
        "message_id": message_id,
        "task": task,
        "tenant_id": tenant_id,
        "fingerprint": fingerprint,
        "processed_at": datetime.now(UTC),
    }
    result = await session.execute(_CLAIM[_dialect_name(session)], parameters)
    if result.scalar_one_or_none() is not None:
        return True
    stored = await session.scalar(_LOOKUP, {"message_id": message_id})
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


class DatabaseInbox:
    """``resilient_task``'s inbox, read from ``processed_messages`` (one primary-key
    lookup per delivery). ``database`` is called on first use, inside the worker
    process's event loop, where the pool must be made."""

    def __init__(self, database: Callable[[], Database]) -> None:
        self._database = database

    async def lookup(self, message_id: str) -> InboxEntry | None:
        validate_message_id(message_id)
        database = self._database()
        # In autocommit: this runs before every delivery, and a single read needs no BEGIN
        # and ROLLBACK round trips around it; on PostgreSQL on the driver's connection.
        if database.dialect == "postgresql":
            row = await fetch_row(database, _LOOKUP_SQL, message_id)
        else:
            async with database.reader.connect() as connection:
                row = (await connection.execute(_LOOKUP, {"message_id": message_id})).first()
        return None if row is None else InboxEntry(fingerprint=row[0])
