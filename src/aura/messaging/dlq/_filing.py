"""Filing: what has landed in the broker's DLQ moved into the store (rows committed, then
the broker messages acked: a crash in between files a second copy, which the store's key
absorbs), and a store row read back as a ``DeadLetter``."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import structlog
from kombu.connection import Connection

from aura import events
from aura.db import Database
from aura.events import DeadLettersDropped
from aura.logs import bounded_text, redact
from aura.messaging._dlq_store import LandedLetter, enforce_retention, file_letters
from aura.messaging.dlq._decode import MAX_HEADER_DEPTH, from_message, json_safe
from aura.messaging.dlq._letter import (
    MAX_ERROR,
    MAX_NAME,
    MAX_SHOWN_BODY,
    DeadLetter,
    OriginalMessage,
    bounded,
)
from aura.messaging.dlq._tasks import argument_tenant, forged
from aura.messaging.topology import DEAD_LETTER_QUEUE, dead_letter_queue

_log = structlog.get_logger("aura.messaging.dlq")
_VIEW_ITEMS = 1000
_MALFORMED_REFUSAL = (
    "a malformed message is kept as it arrived and cannot be replayed: "
    "fix its producer and send it again"
)


@dataclass
class Landed:
    """A broker message as the filer reads it (kombu's or py-amqp's, alike)."""

    body: bytes
    headers: dict[str, Any]
    properties: dict[str, Any]
    content_type: str | None
    content_encoding: str | None
    delivery_tag: Any


def landed(raw: Any) -> Landed:
    properties = dict(getattr(raw, "properties", None) or {})
    headers = getattr(raw, "headers", None)
    if not isinstance(headers, dict):
        headers = properties.get("application_headers")
    body = raw.body
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogateescape")
    return Landed(
        body=bytes(body or b""),
        headers=headers if isinstance(headers, dict) else {},
        properties=properties,
        content_type=properties.get("content_type") or getattr(raw, "content_type", None),
        content_encoding=properties.get("content_encoding")
        or getattr(raw, "content_encoding", None),
        delivery_tag=raw.delivery_info.get("delivery_tag")
        if isinstance(getattr(raw, "delivery_info", None), dict)
        else getattr(raw, "delivery_tag", None),
    )


def view(value: Any, depth: int = 0) -> Any:
    """``value`` as views may show it: every string redacted, then cut to
    ``MAX_SHOWN_BODY`` characters; at most ``_VIEW_ITEMS`` items a list or mapping."""
    if depth > MAX_HEADER_DEPTH:
        return "<nested too deep>"
    if isinstance(value, str):
        return bounded_text(value, MAX_SHOWN_BODY)
    if isinstance(value, dict):
        items = list(value.items())[:_VIEW_ITEMS]
        return {bounded_text(str(k), MAX_NAME): view(v, depth + 1) for k, v in items}
    if isinstance(value, list):
        return [view(v, depth + 1) for v in value[:_VIEW_ITEMS]]
    return value


def _record(letter: DeadLetter, app: Any) -> tuple[dict[str, Any], str | None, str]:
    """The letter's record as views get it, its tenant, and why replay refuses it ("")."""
    record = letter.model_dump(mode="json", exclude={"original"})
    record["task"] = bounded_text(letter.task, 200)
    record["error"] = bounded_text(letter.error, MAX_ERROR)
    if letter.original is not None:
        record["original"] = letter.original.model_dump(mode="json")
        return record, letter.tenant_id, _MALFORMED_REFUSAL
    found = argument_tenant(app, letter.task, letter.task_args, letter.task_kwargs)
    refusal = forged(letter.tenant_id, found) or ""
    tenant = found if found is not None else letter.tenant_id
    record["tenant_id"] = tenant
    # views get the arguments redacted and bounded; replay reads them whole from the
    # letter's bytes
    record["task_args"] = view(redact(record["task_args"]))
    record["task_kwargs"] = view(redact(record["task_kwargs"]))
    return record, tenant, refusal


def to_row(entry: Landed, app: Any = None) -> LandedLetter:
    """A landed broker message as the store's row."""
    letter, kind = from_message(entry)
    record, tenant, refusal = _record(letter, app)
    return LandedLetter(
        letter_id=letter.id,
        fate_id=letter.fate_key[0][:300],
        message_id=letter.message_id[:255],
        reason=letter.reason.value,
        fingerprint=(letter.fingerprint or "")[:128],
        replay_count=letter.replay_count,
        kind=kind,
        task=record["task"][:255],
        queue=letter.queue[:255],
        tenant_id=tenant[:255] if tenant is not None else None,
        retries=letter.retries,
        error_type=bounded_text(letter.error_type, 100),
        error=record["error"],
        refusal=refusal,
        dead_lettered_at=letter.dead_lettered_at,
        record=record,
        body=entry.body,
        properties={
            "content_type": bounded(entry.content_type),
            "content_encoding": bounded(entry.content_encoding),
            "headers": json_safe(entry.headers),
        },
    )


def letter_of(row: Any) -> DeadLetter:
    """A store row as a ``DeadLetter`` (a malformed original with its bytes where the
    row carries them)."""
    record = dict(row.record)
    original = record.pop("original", None)
    record["replay_count"] = row.replay_count
    letter = DeadLetter.model_validate(record)
    letter.id = row.letter_id
    letter.seq = row.seq
    letter.replay_refusal = row.refusal or None
    if original is not None:
        letter.original = OriginalMessage.model_validate(original)
        body = getattr(row, "body", None)
        if body is not None:
            letter.original._raw = bytes(body)
    return letter


async def _file_batches(
    channel: Any, database: Database, source: str, batch_size: int, app: Any
) -> int:
    """File the landed messages batch by batch; the number of rows written."""
    written = 0
    while True:
        batch: list[Landed] = []
        while len(batch) < batch_size:
            raw = channel.basic_get(queue=DEAD_LETTER_QUEUE, no_ack=False)
            if raw is None:
                break
            batch.append(landed(raw))
        if not batch:
            break
        rows = [to_row(entry, app) for entry in batch]
        async with database.engine.begin() as connection:
            written += await file_letters(connection, database.dialect, source, rows)
        for entry in batch:  # committed: now they may leave the broker
            channel.basic_ack(entry.delivery_tag)
        if len(batch) < batch_size:
            break
    return written


async def _retain(database: Database, source: str) -> dict[str, int]:
    """Apply the retention bounds; the letters dropped, by reason (counted and logged)."""
    from aura.config import get_settings

    settings = get_settings()
    async with database.engine.begin() as connection:
        dropped = await enforce_retention(
            connection,
            source,
            max_letters=settings.dlq_retention_letters,
            max_age_days=settings.dlq_retention_days,
        )
    for reason, count in dropped.items():
        events.emit(DeadLettersDropped(reason, count))
    if dropped:
        _log.warning("DLQ retention removed dead letters", dropped=dropped)
    return dropped


async def file_landed(
    broker: Connection, database: Database, *, source: str, batch_size: int, app: Any
) -> tuple[int, dict[str, int]]:
    """Move what has landed into the store; the rows written and the letters retention
    dropped, by reason. Whatever was not acked goes back to the broker queue."""
    from aura.config import get_settings

    channel = broker.channel()
    try:
        dead_letter_queue()(channel).declare()
        written = await _file_batches(channel, database, source, batch_size, app)
        if not written and get_settings().dlq_retention_days <= 0:
            return 0, {}  # nothing new: the count bound has nothing new to bound
        return written, await _retain(database, source)
    finally:
        with contextlib.suppress(Exception):
            channel.close()
