"""/v1/tenants/{tenant_id}/imports: take a catalog (202; each record one message on
bulk_queue, as it came) and say where its records are."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncSession

from aura.catalog import (
    Import,
    add_import,
    add_import_records,
    create_import_with_messages,
    import_counts,
)
from aura.contract import BULK_QUEUE, INGEST_TASK
from aura.db import HELD, Claim, Database, Staged, extend_claim, stage_messages, transactional
from aura.errors import DatabaseTransactionError, NotFoundError
from aura.gateway.bodies import (
    JSON_TYPES,
    MAX_IMPORT_BYTES,
    NDJSON_TYPES,
    SpooledRecords,
    media_type,
    read_body,
    split_import,
    spool_lines,
    unencoded,
)
from aura.gateway.committed import Written, publish_after_commit
from aura.gateway.openapi import IMPORT_BODY
from aura.gateway.relay import staging_lease
from aura.gateway.schemas import ERROR_RESPONSES, ImportAccepted, ImportCounts, error_responses
from aura.gateway.state import Authorized, Gateway, authorize

__all__ = ["get_import", "post_import", "router"]

_PART = 1000  # import records written per statement
_PUBLISHED_INLINE = 500  # an import this small is published from memory, in the request
_log = structlog.get_logger("aura.gateway")
router = APIRouter(prefix="/v1/tenants/{tenant_id}/imports")


@router.post(
    "",
    status_code=202,
    response_model=ImportAccepted,
    responses=error_responses(401, 404, 413, 415, 422, 503),
    openapi_extra=IMPORT_BODY,
    summary="Import a catalog: each record becomes one message, processed or dead-lettered",
)
async def post_import(tenant_id: uuid.UUID, request: Request) -> JSONResponse:
    gw = await authorize(request, tenant_id)  # served directly: no dependency solving
    records = await _read_records(gw, request)
    count = len(records) if isinstance(records, list) else records.count
    import_id = uuid.uuid4()
    accepted = JSONResponse({"import_id": str(import_id), "accepted": count}, status_code=202)
    try:
        if isinstance(records, list) or count <= _PUBLISHED_INLINE:
            written = await _accept_small_import(
                gw.database, tenant_id, import_id, list(records), _claim(gw)
            )
        else:
            async with gw.database.session() as session:
                written = await _accept_import(
                    session, tenant_id, import_id, records, count, _claim(gw), gw.outbox_lease
                )
    except DatabaseTransactionError as exc:
        if not exc.commit_outcome_unknown or not await _import_exists(gw.database, import_id):
            raise
        _log.warning("commit outcome was unknown; the import is committed", origin="import")
        return accepted  # its messages are the relay's once their lease expires
    finally:
        if isinstance(records, SpooledRecords):
            records.close()
    await publish_after_commit(gw, written, request.scope, origin="import")
    return accepted


@router.get(
    "/{import_id}",
    response_model=ImportCounts,
    responses=ERROR_RESPONSES,
    summary="Where an import's records are",
)
async def get_import(tenant_id: uuid.UUID, import_id: uuid.UUID, gw: Authorized) -> dict[str, Any]:
    async with gw.database.session() as session:
        counts = await import_counts(session, tenant_id, import_id)
    if counts is None:
        raise NotFoundError(f"unknown import {import_id}", field="import_id")
    return {"import_id": str(import_id), **counts}


async def _read_records(gw: Gateway, request: Request) -> list[str] | SpooledRecords:
    """The import's records: a JSON array parsed whole (MAX_IMPORT_BYTES at most), or JSON
    lines checked as they arrive and spooled (any size, bounded memory)."""
    kind = media_type(request.headers.get("content-type", ""), JSON_TYPES | NDJSON_TYPES)
    unencoded(request.headers.get("content-encoding"))
    declared = request.headers.get("content-length")
    if kind in JSON_TYPES:
        raw = await read_body(request.stream(), declared, MAX_IMPORT_BYTES)
        return split_import(raw, kind, max_records=gw.import_max_records)
    return await spool_lines(
        request.stream(),
        declared,
        max_bytes=gw.import_max_bytes,
        max_records=gw.import_max_records,
    )


def _claim(gw: Gateway) -> Claim:
    """Who publishes an import's messages: the fair dispatcher (held, TENANT_SCHEDULING
    fair: ``aura.gateway.dispatch``), or the request itself (fifo)."""
    return HELD if gw.holds_imports else Claim.new(staging_lease(gw.outbox_lease))


def _ingest(message_id: str, tenant_id: uuid.UUID, import_id: uuid.UUID, record: str) -> Staged:
    """One import record's message: the record as it came, on bulk_queue."""
    return Staged(
        message_id,
        tenant_id,
        INGEST_TASK,
        BULK_QUEUE,
        [record, str(tenant_id)],
        {"import_id": str(import_id)},
    )


async def _accept_small_import(
    database: Database,
    tenant_id: uuid.UUID,
    import_id: uuid.UUID,
    records: list[str],
    claim: Claim,
) -> Written:
    """An import small enough to hold (a JSON array, or at most _PUBLISHED_INLINE lines):
    the import, its records and their messages in one statement on PostgreSQL."""
    staged = [_ingest(str(uuid.uuid4()), tenant_id, import_id, record) for record in records]
    await create_import_with_messages(database, tenant_id, import_id, staged, claim)
    if len(staged) > _PUBLISHED_INLINE:  # a large JSON array: published as a large import
        return Written(claim, [m.message_id for m in staged], None)
    return Written(claim, [m.message_id for m in staged], staged)


@transactional
async def _accept_import(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    import_id: uuid.UUID,
    records: Iterable[str],
    count: int,
    claim: Claim,
    lease: float,
) -> Written:
    """The import, a pending row per record and a message per record: one transaction,
    written a part at a time (an import of any size in bounded memory)."""
    await add_import(session, tenant_id, count, import_id=import_id)
    kept: list[Staged] | None = [] if count <= _PUBLISHED_INLINE else None
    ids: list[str] = []
    iterator = iter(records)
    while part := list(itertools.islice(iterator, _PART)):
        message_ids = [str(uuid.uuid4()) for _ in part]
        await add_import_records(session, import_id, tenant_id, message_ids, first=len(ids))
        staged = [
            _ingest(message_id, tenant_id, import_id, record)
            for message_id, record in zip(message_ids, part, strict=True)
        ]
        await stage_messages(session, staged, claim)
        if kept is not None:
            kept += staged
        ids += message_ids
    if kept is None and claim != HELD:  # a long transaction: its lease from the commit on
        now = datetime.now(UTC)
        claim = Claim(claim.owner, now + timedelta(seconds=staging_lease(lease)))
        await extend_claim(session, claim, now=now)
    return Written(claim, ids, kept)


async def _import_exists(database: Database, import_id: uuid.UUID) -> bool:
    """Whether an import whose COMMIT outcome was unknown is there (False if unsure)."""
    try:
        async with database.session() as session:
            return await session.get(Import, import_id) is not None
    except Exception:
        return False
