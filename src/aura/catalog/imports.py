"""Bulk imports: one row per import and per record, so progress can be counted.

A record is ``pending`` until the worker commits its product (``done``, in the same
transaction as the product) or dead-letters it (``dead_lettered``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from aura.catalog.models import Import, ImportRecord
from aura.db import Claim, Database, Staged, execute_atomically, stage_messages, transactional
from aura.errors import NotFoundError

__all__ = [
    "RECORD_STATUSES",
    "add_import",
    "add_import_records",
    "create_import",
    "create_import_with_messages",
    "import_counts",
    "mark_record",
]

RECORD_STATUSES = ("pending", "done", "dead_lettered")
_CHUNK = 1000


@transactional
async def create_import(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    records: int,
    *,
    import_id: uuid.UUID | None = None,
) -> tuple[Import, list[str]]:
    """An import of ``records`` records, all pending; returns it and the records' message ids.
    ``import_id`` lets a caller whose COMMIT outcome is unknown look for it afterwards."""
    batch = await add_import(session, tenant_id, records, import_id=import_id)
    message_ids = [str(uuid.uuid4()) for _ in range(records)]
    for start in range(0, records, _CHUNK):
        await add_import_records(
            session, batch.id, tenant_id, message_ids[start : start + _CHUNK], first=start
        )
    return batch, message_ids


async def add_import(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    records: int,
    *,
    import_id: uuid.UUID | None = None,
) -> Import:
    """The import's row (in the caller's transaction); its records are added in parts
    with ``add_import_records``, so an import of any size is written in bounded memory."""
    batch = Import(
        id=import_id or uuid.uuid4(), tenant_id=tenant_id, accepted=records, created_at=_utcnow()
    )
    await session.execute(
        insert(Import).values(
            id=batch.id, tenant_id=tenant_id, accepted=records, created_at=batch.created_at
        )
    )
    return batch


async def add_import_records(
    session: AsyncSession,
    import_id: uuid.UUID,
    tenant_id: uuid.UUID,
    message_ids: Sequence[str],
    *,
    first: int,
) -> None:
    """Pending records ``first``, ``first + 1``, ... of an import (in the caller's
    transaction), one per message id."""
    now = _utcnow()
    rows = [
        {
            "message_id": m,
            "import_id": import_id,
            "tenant_id": tenant_id,
            "position": first + i,
            "status": "pending",
            "updated_at": now,
        }
        for i, m in enumerate(message_ids)
    ]
    for start in range(0, len(rows), _CHUNK):
        await session.execute(insert(ImportRecord), rows[start : start + _CHUNK])


def _utcnow() -> datetime:
    return datetime.now(UTC)


async def mark_record(
    session: AsyncSession, message_id: str, status: str, *, product_id: uuid.UUID | None = None
) -> None:
    """Set a record's status (in the caller's transaction); unknown ids change nothing."""
    if status not in RECORD_STATUSES:
        raise ValueError(f"unknown record status {status!r}")
    await session.execute(
        update(ImportRecord)
        .where(ImportRecord.message_id == message_id)
        .values(status=status, product_id=product_id, updated_at=datetime.now(UTC))
    )


async def import_counts(
    session: AsyncSession, tenant_id: uuid.UUID, import_id: uuid.UUID
) -> dict[str, int] | None:
    """accepted / done / dead_lettered / pending of one of the tenant's imports."""
    batch = await session.scalar(
        select(Import).where(Import.id == import_id, Import.tenant_id == tenant_id)
    )
    if batch is None:
        return None
    rows = await session.execute(
        select(ImportRecord.status, func.count())
        .where(ImportRecord.import_id == import_id)
        .group_by(ImportRecord.status)
    )
    counts = {status: 0 for status in RECORD_STATUSES} | {s: int(n) for s, n in rows.all()}
    return {"accepted": batch.accepted, **counts}


# A small import in one statement (``aura.db._statement``): the import, its records and their
# messages, all or nothing.
_WITH_MESSAGES = """
    WITH batch AS (
        INSERT INTO imports (id, tenant_id, accepted, created_at) VALUES ($1, $2, $3, $4)
    ), records AS (
        INSERT INTO import_records (message_id, import_id, tenant_id, position, status,
                                    updated_at)
        SELECT r.message_id, $1, $2, r.position - 1, 'pending', $4
        FROM unnest($5::text[]) WITH ORDINALITY AS r(message_id, position)
    )
    INSERT INTO outbox (message_id, tenant_id, task, queue, args, kwargs, created_at,
                        claimed_by, claimed_until, traceparent)
    SELECT o.message_id, $2, $6, $7, o.args, $8::json, $4, $9, $10, $12
    FROM unnest($5::text[], $11::json[]) AS o(message_id, args)
"""


async def create_import_with_messages(
    database: Database,
    tenant_id: uuid.UUID,
    import_id: uuid.UUID,
    messages: Sequence[Staged],
    claim: Claim,
) -> None:
    """An import whose records are ``messages`` (one task, queue and kwargs for all), each
    record pending and its message staged under ``claim``: all or nothing. On PostgreSQL
    one statement (``execute_atomically``); elsewhere one transaction. An unknown tenant is
    a NotFoundError."""
    if {(m.task, m.queue, json.dumps(m.kwargs, sort_keys=True)) for m in messages} != {
        (messages[0].task, messages[0].queue, json.dumps(messages[0].kwargs, sort_keys=True))
    }:
        raise ValueError("an import's messages share one task, queue and kwargs")
    if database.dialect != "postgresql":
        async with database.session() as session:
            await _in_session(session, tenant_id, import_id, messages, claim)
        return
    first = messages[0]
    try:
        await execute_atomically(
            database,
            "create_import_with_messages",
            _WITH_MESSAGES,
            import_id,
            tenant_id,
            len(messages),
            _utcnow(),
            [m.message_id for m in messages],
            first.task,
            first.queue,
            json.dumps(first.kwargs),
            claim.owner,
            claim.until,
            [json.dumps(m.args) for m in messages],
            first.traceparent,  # one request staged them all
        )
    except asyncpg.ForeignKeyViolationError as exc:  # a new import's only reference
        raise NotFoundError(f"unknown tenant {tenant_id}", field="tenant_id") from exc


@transactional
async def _in_session(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    import_id: uuid.UUID,
    messages: Sequence[Staged],
    claim: Claim,
) -> None:
    await add_import(session, tenant_id, len(messages), import_id=import_id)
    await add_import_records(
        session, import_id, tenant_id, [m.message_id for m in messages], first=0
    )
    await stage_messages(session, messages, claim)
