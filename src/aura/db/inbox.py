"""The inbox: effects happen once, however often a message is delivered.

A task calls ``claim_message`` inside the same ``@transactional`` function as its effect.
The first delivery inserts the message id and goes on; a redelivery finds the row and
skips the effect. Because the row and the effect commit (or roll back) together, a crash
anywhere -- even a COMMIT whose reply was lost -- leaves either both or neither, and the
next delivery decides correctly. Two deliveries running at once serialize on the
primary key: the second waits for the first's outcome.
"""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from aura.db.models import ProcessedMessage
from aura.message_id import validate_message_id

__all__ = ["already_processed", "claim_message"]


async def claim_message(
    session: AsyncSession, message_id: str, *, task: str, tenant_id: uuid.UUID | None = None
) -> bool:
    """Record ``message_id`` in this transaction; False if its effect is already committed."""
    validate_message_id(message_id)
    dialect = session.get_bind().dialect.name
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    statement = (
        insert(ProcessedMessage)
        .values(message_id=message_id, task=task, tenant_id=tenant_id)
        .on_conflict_do_nothing(index_elements=[ProcessedMessage.message_id])
        .returning(ProcessedMessage.message_id)
    )
    claimed = (await session.execute(statement)).scalar_one_or_none()
    return claimed is not None


async def already_processed(session: AsyncSession, message_id: str) -> bool:
    """True when the effect of ``message_id`` is committed."""
    validate_message_id(message_id)
    found = await session.scalar(
        select(ProcessedMessage.message_id).where(ProcessedMessage.message_id == message_id)
    )
    return found is not None
