"""The dead-letter queue: where a message goes when it will not succeed, and why.

The DLQ is one durable quorum queue (``aura.dlq``). It holds two kinds of entries, shown
alike by the reader:

* dead letters written by ``route_to_dlq`` (JSON ``DeadLetter`` records): the original
  arguments, task, queue, reason, error, retries, first and last failure, tenant;
* messages the broker dead-lettered itself: after the work queue's delivery limit (their
  worker died on every delivery), shown with reason ``worker_lost``; or rejected by
  Celery after a failure it did not retry, shown as ``task_failed``.

Reasons (a fixed set, also the ``messages_sent_to_dlq_total`` label):

    poison_pill              malformed input; no retry could fix it (zero retries spent)
    max_retries_exceeded     a transient error outlived the retry budget
    max_deferrals_exceeded   the LLM circuit stayed open longer than the deferral bound
    worker_lost              the worker died on every delivery (SIGKILL, OOM, hard limit)
    task_failed              a task without DLQ routing failed; Celery rejected it and the
                             broker dead-lettered it (nothing is acked away on failure)
    malformed_message        not a Celery protocol 2 message for a known task (not JSON,
                             wrong content type or shape, bad headers, unknown task,
                             arguments that do not bind); kept byte for byte, see below
    conflicting_message_id   its id was already used by a message with another payload
                             (like an idempotency key reused with another request body)

A malformed message is stored as it arrived -- the original body bytes, content type,
encoding and headers -- with ``x-aura-*`` headers that say why (``x-aura-format:
original``), so nothing about it is lost; a compressed one that would inflate past the
message size limit keeps its compressed bytes (``aura.messaging.compression``). Views show
its text redacted and bounded; its bytes are kept for the record, never printed, and it
cannot be replayed (its producer must be fixed).

Where letters live: the broker queue is where they land (``route_to_dlq`` waits for the
broker's publisher confirm before it returns, so a caller acks the original only once the
dead letter is safe: a crash in between duplicates it, never loses it). Every read first
files what has landed into the DLQ store (``aura.messaging.dlq_store``: rows committed,
then the broker messages acked), then queries the store; the broker queue is never
browsed, so reading changes no letter, header, delivery count or order. One letter per
(message id, reason, fingerprint): the store's key decides, not Redis.

Replay sends a letter back to the queue it was dead-lettered from (any app's queue;
``to_queue`` overrides) with header ``aura_replay_count``; the task carries that count
into the next dead letter, so a replayed message that fails again is dead-lettered again
with its count, never acked away. Error texts and arguments are redacted before they are
written, and every view redacts again before it cuts: secrets never reach the DLQ's views.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import getpass
import json
import re
import tempfile
import threading
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal, TypeVar

import structlog
from kombu.connection import Connection
from kombu.messaging import Producer
from pydantic import BaseModel, Field, PrivateAttr
from sqlalchemy import case, delete, func, select, update

from aura import events
from aura.db.engine import Database
from aura.errors import ServiceUnavailableError
from aura.events import DeadLetterReason, DeadLettersDropped, MessageDeadLettered
from aura.logs import bounded_text, describe_exception, redact
from aura.messaging.compression import bound_compression
from aura.messaging.dlq_store import (
    DEAD,
    LISTED,
    REPLAYED,
    Filter,
    LandedLetter,
    dead_letters,
    enforce_retention,
    ensure_tables,
    file_letters,
    mark_replayed,
    replays,
)
from aura.messaging.runtime import run_in_own_loop
from aura.messaging.topology import DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, dead_letter_queue

__all__ = [
    "MAX_SHOWN_BODY",
    "REPLAY_HEADER",
    "DeadLetter",
    "DeadLetterQueue",
    "OriginalMessage",
    "ReplayReport",
    "dead_letter_original",
    "publish_dead_letter",
    "purge",
    "queue_of",
    "replay",
    "route_to_dlq",
    "source_of",
    "store_url",
    "task_checks",
]

T = TypeVar("T")
_MAX_ERROR = 1000
_MAX_NAME = 200  # a header name shown in a view
MAX_SHOWN_BODY = 64 * 1024
"""The most characters of a malformed message's body a view shows (redacted)."""
REPLAY_HEADER = "aura_replay_count"
"""The message header that says how often a message was replayed from the DLQ."""
_log = structlog.get_logger("aura.messaging.dlq")
_ORIGINAL_FORMAT = "original"  # x-aura-format of a malformed message kept as it arrived
_MAX_HEADER_DEPTH = 8
# Headers kombu acts on when it builds a message (a compression header makes it inflate the
# body, and fail on one that is not compressed): a malformed original keeps them renamed,
# or the DLQ itself could not be read.
_DISARMED = ("compression",)


class OriginalMessage(BaseModel):
    """A malformed message as it arrived, as views show it: the first ``MAX_SHOWN_BODY``
    characters of its body as text (bytes that are not UTF-8 as ``\\xNN``), redacted;
    ``cut`` if there was more; its size in bytes, content type, encoding and headers
    (redacted). The bytes themselves stay in the store: ``raw()`` where the reader was
    asked for them (``DeadLetterQueue.list(raw=True)``)."""

    body: str
    body_encoding: Literal["utf-8"] = "utf-8"
    cut: bool = False
    size: int
    content_type: str | None = None
    content_encoding: str | None = None
    headers: dict[str, Any] = Field(default_factory=dict)
    _raw: bytes | None = PrivateAttr(default=None)

    def raw(self) -> bytes:
        """The bytes as they arrived (never printed by Aura's views)."""
        if self._raw is None:
            raise LookupError("read with DeadLetterQueue.list(raw=True) to get the bytes")
        return self._raw


class DeadLetter(BaseModel):
    """One dead letter, as stored in the DLQ (JSON)."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    message_id: str
    reason: DeadLetterReason
    task: str
    queue: str
    task_args: list[Any] = Field(default_factory=list)
    task_kwargs: dict[str, Any] = Field(default_factory=dict)
    error_type: str = ""
    error: str = ""
    retries: int = 0
    first_failure_at: datetime
    last_failure_at: datetime
    tenant_id: str | None = None
    dead_lettered_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    original: OriginalMessage | None = None  # set for malformed messages only
    fingerprint: str | None = None  # of the payload (aura.messaging.idempotency)
    replay_count: int = 0  # how often it was replayed from the DLQ before this letter
    seq: int | None = None  # its position in the store (newest last); set by reads
    replay_refusal: str | None = None  # why it cannot be replayed, where that is known

    @property
    def fate_key(self) -> tuple[str, str, str]:
        """One fate per message id, reason and payload: the key the reader dedupes on."""
        return (self.message_id or f"letter:{self.id}", self.reason.value, self.fingerprint or "")


def _error_text(error_text: str | None, error: BaseException | None) -> str:
    """One line, at most _MAX_ERROR characters, redacted; cut before anything else runs
    (a 10 MB error costs no more than a short one), and never raises."""
    if error_text is None and error is not None:
        try:
            error_text = str(error)
        except Exception:
            error_text = f"<unprintable {type(error).__name__}>"
    head = (error_text or "")[: _MAX_ERROR * 2]
    return bounded_text(" ".join(head.split()), _MAX_ERROR)


def publish_dead_letter(connection: Connection, letter: DeadLetter) -> None:
    """Publish ``letter`` to the DLQ and wait for the broker's confirm (blocking)."""
    with connection.Producer() as producer:
        producer.publish(
            letter.model_dump(mode="json"),
            exchange=DEAD_LETTER_EXCHANGE,
            routing_key=DEAD_LETTER_QUEUE,
            declare=[dead_letter_queue()],
            serializer="json",
            delivery_mode="persistent",
            message_id=letter.id,
            headers={"x-aura-reason": letter.reason.value, "x-aura-task": letter.task},
            retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
        )


async def route_to_dlq(
    message_id: str,
    reason: DeadLetterReason | str,
    *,
    connection: Connection,
    task: str = "",
    queue: str = "",
    args: list[Any] | tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    error: BaseException | None = None,
    error_text: str | None = None,
    retries: int = 0,
    first_failure_at: datetime | None = None,
    tenant_id: str | None = None,
    fingerprint: str | None = None,
    replay_count: int = 0,
) -> DeadLetter:
    """Publish a dead letter and wait for the broker's confirm; count it; return it.

    ``connection`` must be a kombu connection with ``confirm_publish`` set (Aura's Celery
    app configures its broker connections so). ``error_text`` replaces ``str(error)``
    (the poison detector's readable reason).
    """
    now = datetime.now(UTC)
    letter = DeadLetter(
        message_id=message_id,
        reason=DeadLetterReason(reason),
        task=task,
        queue=queue,
        task_args=redact(list(args)),
        task_kwargs=redact(dict(kwargs or {})),
        error_type=type(error).__name__ if error is not None else "",
        error=_error_text(error_text, error),
        retries=retries,
        first_failure_at=first_failure_at or now,
        last_failure_at=now,
        tenant_id=tenant_id,
        fingerprint=fingerprint,
        replay_count=replay_count,
    )
    await asyncio.to_thread(publish_dead_letter, connection, letter)
    events.emit(MessageDeadLettered(letter.reason, task))
    return letter


def dead_letter_original(
    connection: Connection,
    message: Any,
    *,
    kind: str,
    error: str,
    queue: str,
    reason: DeadLetterReason = DeadLetterReason.MALFORMED_MESSAGE,
) -> DeadLetter:
    """Put a malformed broker message (a ``kombu.Message``) into the DLQ exactly as it
    arrived, with ``x-aura-*`` headers that say why; wait for the confirm (blocking).

    ``kind`` says what was wrong in a word or two (``not_json``, ``unknown_task``, ...);
    ``error`` says it in a sentence. The caller acks the original only after this returns.
    """
    headers = message.headers if isinstance(message.headers, dict) else {}
    kept = {k: v for k, v in headers.items() if not str(k).startswith("x-aura-")}
    for name in _DISARMED:  # kept under another name: kombu would act on it when read
        if name in kept:
            kept[f"x-aura-original-{name}"] = kept.pop(name)
    message_id = headers.get("id")
    now = datetime.now(UTC)
    letter_id = uuid.uuid4().hex
    text = _error_text(error, None)
    body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
    content_type = message.content_type or None
    content_encoding = message.content_encoding or None
    with connection.Producer() as producer:
        producer.publish(
            body,
            exchange=DEAD_LETTER_EXCHANGE,
            routing_key=DEAD_LETTER_QUEUE,
            declare=[dead_letter_queue()],
            content_type=content_type or "application/octet-stream",
            content_encoding=content_encoding or "binary",
            delivery_mode="persistent",
            message_id=letter_id,
            headers={
                **kept,
                "x-aura-format": _ORIGINAL_FORMAT,
                "x-aura-reason": reason.value,
                "x-aura-kind": kind,
                "x-aura-error": text,
                "x-aura-queue": queue,
                "x-aura-dead-lettered-at": now.isoformat(),
                "x-aura-original-content-type": content_type or "",
                "x-aura-original-content-encoding": content_encoding or "",
            },
            retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
        )
    events.emit(MessageDeadLettered(reason, ""))  # no task label: the name is untrusted
    return DeadLetter(
        id=letter_id,
        message_id=_safe_id(message_id),
        reason=reason,
        task=_bounded(headers.get("task")),
        queue=queue,
        error_type=kind,
        error=text,
        first_failure_at=now,
        last_failure_at=now,
        dead_lettered_at=now,
    )


def _safe_id(value: Any) -> str:
    from aura.message_id import validate_message_id

    try:
        return validate_message_id(value)
    except Exception:
        return ""


def _bounded(value: Any, limit: int = 200) -> str:
    """A header's text, redacted and then bounded; "" when it is not text."""
    return bounded_text(value, limit) if isinstance(value, str) else ""


def _json_safe(value: Any, depth: int = 0) -> Any:
    """AMQP header values (bytes, datetimes, decimals, nested tables) as JSON values."""
    if depth > _MAX_HEADER_DEPTH:
        return "<nested too deep>"
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else repr(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v, depth + 1) for v in value]
    return repr(value)


def _added_by_dead_lettering(header: str) -> bool:
    """Headers Aura or the broker put on when the message was dead-lettered."""
    return header.startswith(("x-aura-", "x-death", "x-first-death-", "x-last-death-"))


def _shown_text(body: bytes, limit: int = MAX_SHOWN_BODY) -> tuple[str, bool]:
    """The first ``limit`` characters of ``body`` as text (bytes that are not UTF-8 shown
    as ``\\xNN``, never base64, so redaction sees what they say), redacted; cut?"""
    head = body[: limit * 4].decode("utf-8", "backslashreplace")
    return bounded_text(head, limit), len(head) > limit or len(body) > limit * 4


def _original_from_message(message: Any, headers: dict[str, Any]) -> DeadLetter:
    body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
    text, cut = _shown_text(body)
    at_text = headers.get("x-aura-dead-lettered-at")
    try:
        at = datetime.fromisoformat(at_text) if isinstance(at_text, str) else datetime.now(UTC)
    except ValueError:
        at = datetime.now(UTC)
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    original = OriginalMessage(
        body=text,
        body_encoding="utf-8",
        cut=cut,
        size=len(body),
        content_type=_bounded(headers.get("x-aura-original-content-type")) or None,
        content_encoding=_bounded(headers.get("x-aura-original-content-encoding")) or None,
        headers=_shown_headers(
            {k: v for k, v in headers.items() if not _added_by_dead_lettering(k)}
            | {
                name: headers[f"x-aura-original-{name}"]
                for name in _DISARMED
                if f"x-aura-original-{name}" in headers
            }
        ),
    )
    original._raw = body
    reason_text = str(headers.get("x-aura-reason", DeadLetterReason.MALFORMED_MESSAGE.value))
    try:
        reason = DeadLetterReason(reason_text)
    except ValueError:
        reason = DeadLetterReason.MALFORMED_MESSAGE
    return DeadLetter(
        id=_safe_letter_id(message.properties.get("message_id")),
        message_id=_safe_id(headers.get("id")),
        reason=reason,
        task=_bounded(headers.get("task")),
        queue=_bounded(headers.get("x-aura-queue")),
        error_type=_bounded(headers.get("x-aura-kind")),
        error=_bounded(headers.get("x-aura-error"), _MAX_ERROR),
        first_failure_at=at,
        last_failure_at=at,
        dead_lettered_at=at,
        replay_count=_replay_count(headers),
        original=original,
    )


def _shown_headers(headers: dict[str, Any]) -> dict[str, Any]:
    """Headers as JSON, each name and value redacted before it is bounded."""
    safe = _json_safe(headers)
    return {
        bounded_text(str(k), _MAX_NAME): _bounded_value(v)
        for k, v in redact(safe).items()
        if isinstance(safe, dict)
    }


def _bounded_value(value: Any) -> Any:
    if isinstance(value, str):
        return bounded_text(value, _MAX_ERROR)
    if isinstance(value, dict):
        return {bounded_text(str(k), _MAX_NAME): _bounded_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_bounded_value(v) for v in value[:100]]
    return value


def _safe_letter_id(value: Any) -> str:
    if isinstance(value, str) and 0 < len(value) <= 64 and value.isprintable():
        return value
    return uuid.uuid4().hex


def _replay_count(headers: dict[str, Any]) -> int:
    value = headers.get(REPLAY_HEADER)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _from_message(message: Any) -> tuple[DeadLetter, str]:
    """Any DLQ entry as a ``DeadLetter`` and its kind (``aura``, ``broker``,
    ``original``): never raises, whatever the queue holds."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    try:
        if headers.get("x-aura-format") == _ORIGINAL_FORMAT:
            return _original_from_message(message, headers), "original"
        if "x-aura-reason" in headers:
            letter = DeadLetter.model_validate(json.loads(message.body))
            if letter.original is not None:
                raise ValueError("a JSON dead letter carries no original")
            return letter, "aura"
        return _from_broker(message, headers), "broker"
    except Exception as exc:  # an entry nobody here wrote: show it, do not fail the read
        return _original_from_message(
            message,
            {
                **headers,
                "x-aura-reason": DeadLetterReason.MALFORMED_MESSAGE.value,
                "x-aura-kind": "unreadable_dead_letter",
                "x-aura-error": f"this DLQ entry cannot be read: {type(exc).__name__}",
            },
        ), "original"


def _from_broker(message: Any, headers: dict[str, Any]) -> DeadLetter:
    # A Celery message dead-lettered by the broker (delivery limit, or rejected):
    # protocol 2 body; everything in it is untrusted and redacted like the rest.
    deaths = headers.get("x-death") or [{}]
    death = deaths[0] if isinstance(deaths, list) and deaths else {}
    death = death if isinstance(death, dict) else {}
    broker_reason = _bounded(headers.get("x-first-death-reason", death.get("reason", "unknown")))
    reason = (
        DeadLetterReason.WORKER_LOST
        if broker_reason == "delivery_limit"
        else DeadLetterReason.TASK_FAILED
    )
    args, kwargs, _embed = json.loads(message.body)
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ValueError("not a Celery protocol 2 body")
    if not isinstance(headers.get("task"), str):
        raise ValueError("no task header")
    when = death.get("time")
    at = when if isinstance(when, datetime) else datetime.now(UTC)
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    count = death.get("count", 0)
    return DeadLetter(
        id=_safe_letter_id(headers.get("id") or message.properties.get("message_id")),
        message_id=_safe_id(headers.get("id")),
        reason=reason,
        task=_bounded(headers.get("task")),
        queue=_bounded(death.get("queue")),
        task_args=redact(args),
        task_kwargs=redact(kwargs),
        error_type="WorkerLost" if reason is DeadLetterReason.WORKER_LOST else "Rejected",
        error=f"dead-lettered by the broker: {broker_reason}",
        retries=count if isinstance(count, int) else 0,
        first_failure_at=at,
        last_failure_at=at,
        dead_lettered_at=at,
        replay_count=_replay_count(headers),
    )


@dataclass
class _Landed:
    """A broker message as the filer reads it (kombu's or py-amqp's, alike)."""

    body: bytes
    headers: dict[str, Any]
    properties: dict[str, Any]
    content_type: str | None
    content_encoding: str | None
    delivery_tag: Any


def _landed(raw: Any) -> _Landed:
    properties = dict(getattr(raw, "properties", None) or {})
    headers = getattr(raw, "headers", None)
    if not isinstance(headers, dict):
        headers = properties.get("application_headers")
    body = raw.body
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogateescape")
    return _Landed(
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


def _argument_tenant(app: Any, task: str, args: list[Any], kwargs: dict[str, Any]) -> str | None:
    """The tenant the arguments are for: ``tenant_id`` by name, or by position where the
    task (registered in ``app``) takes a ``tenant_id`` parameter."""
    value = kwargs.get("tenant_id")
    if value is None:
        registered = _registered(app, task)
        signature = getattr(registered, "aura_signature", None)
        if signature is not None:
            try:
                bound = signature.bind_partial(*args, **kwargs)
            except TypeError:
                return None
            value = bound.arguments.get("tenant_id")
    return str(value) if value is not None else None


def _registered(app: Any, name: str) -> Any:
    """``app``'s task ``name``, if registered; never finalizes the app (``app.tasks``
    would, binding every shared task of the process to it)."""
    if app is None or not name:
        return None
    registry = app.tasks if app.finalized else getattr(app, "_tasks", {})
    return registry.get(name)


def _to_row(landed: _Landed, app: Any = None) -> LandedLetter:
    letter, kind = _from_message(landed)
    record = letter.model_dump(mode="json", exclude={"original"})
    record["task"] = bounded_text(letter.task, 200)
    refusal = ""
    tenant = letter.tenant_id
    if letter.original is not None:
        record["original"] = letter.original.model_dump(mode="json")
        refusal = (
            "a malformed message is kept as it arrived and cannot be replayed: "
            "fix its producer and send it again"
        )
    else:
        found = _argument_tenant(app, letter.task, letter.task_args, letter.task_kwargs)
        if found is not None and tenant is not None and found != tenant:
            refusal = (
                f"forged: filed under tenant {bounded_text(tenant, 64)!r} but its "
                f"arguments are for tenant {bounded_text(found, 64)!r}"
            )
        tenant = found if found is not None else tenant
        record["tenant_id"] = tenant
        # views get the arguments redacted and bounded; replay reads them whole from the
        # letter's bytes
        record["task_args"] = _view(redact(record["task_args"]))
        record["task_kwargs"] = _view(redact(record["task_kwargs"]))
    record["error"] = bounded_text(letter.error, _MAX_ERROR)
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
        body=landed.body,
        properties={
            "content_type": _bounded(landed.content_type),
            "content_encoding": _bounded(landed.content_encoding),
            "headers": _json_safe(landed.headers),
        },
    )


_VIEW_ITEMS = 1000


def _view(value: Any, depth: int = 0) -> Any:
    """``value`` as views may show it: every string redacted, then cut to
    ``MAX_SHOWN_BODY`` characters; at most ``_VIEW_ITEMS`` items a list or mapping."""
    if depth > _MAX_HEADER_DEPTH:
        return "<nested too deep>"
    if isinstance(value, str):
        return bounded_text(value, MAX_SHOWN_BODY)
    if isinstance(value, dict):
        items = list(value.items())[:_VIEW_ITEMS]
        return {bounded_text(str(k), _MAX_NAME): _view(v, depth + 1) for k, v in items}
    if isinstance(value, list):
        return [_view(v, depth + 1) for v in value[:_VIEW_ITEMS]]
    return value


def _letter_of(row: Any) -> DeadLetter:
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


# --- the reader -----------------------------------------------------------------------


_memory_stores: dict[str, str] = {}
_memory_lock = threading.Lock()
_ensured: set[str] = set()


def store_url(connection: Connection | None = None) -> str:
    """The DLQ store's database: ``DLQ_DATABASE_URL``, else ``DATABASE_URL`` (else the
    embedded SQLite file); for kombu's in-memory broker, a SQLite file of this process."""
    from aura.config import get_settings
    from aura.db.engine import database_url

    settings = get_settings()
    if settings.dlq_database_url is not None:
        return settings.dlq_database_url
    if connection is not None and connection.transport_cls in ("memory",):
        with _memory_lock:
            if "memory" not in _memory_stores:
                directory = tempfile.mkdtemp(prefix="aura-dlq-")
                _memory_stores["memory"] = f"sqlite+aiosqlite:///{directory}/dlq.db"
            return _memory_stores["memory"]
    return database_url(settings)


def source_of(connection: Connection) -> str:
    """What a store calls this broker: its virtual host (one vhost, one DLQ), or the
    in-memory broker's name."""
    if connection.transport_cls == "memory":
        return f"memory://{connection.hostname or ''}"
    return str(connection.virtual_host or "/")


@dataclass
class ReplayReport:
    """What ``replay`` did: the letters sent back, and each refused one with the reason."""

    replayed: list[DeadLetter] = field(default_factory=list)
    refused: list[tuple[DeadLetter, str]] = field(default_factory=list)


ReplayCheck = Callable[[DeadLetter], "str | None"]


class DeadLetterQueue:
    """The DLQ: what has landed in the broker queue is filed into the store (committed,
    then acked) and every read is a query of the store, so reading changes no letter,
    header or order, however often it runs.

    ``database`` is the store's URL (or a ``Database``, whose URL is used); by default
    ``store_url(connection)``. ``source`` names this broker in the store (its vhost).
    ``app`` is the Celery app whose tasks the letters are for (default: the one
    ``aura.messaging.configure`` made the default): filing finds each letter's tenant in
    its arguments by the task's parameters, and replay applies its tasks' checks
    (``task_checks``)."""

    def __init__(
        self,
        connection: Connection,
        database: Database | str | None = None,
        *,
        source: str | None = None,
        batch: int = 500,
        app: Any = None,
    ) -> None:
        bound_compression()
        if app is None:  # not celery.current_app: making one would bind every shared task
            from aura.messaging.app import configured_app

            app = configured_app()
        self.app = app
        self.connection = connection
        if isinstance(database, Database):
            database = database.url
        self.url = database or store_url(connection)
        self.source = source or source_of(connection)
        self.batch = batch
        self.dropped: dict[str, int] = {}

    # -- filing ---------------------------------------------------------------------

    def _database(self) -> Database:
        return Database(self.url, pool_size=2, max_overflow=2)

    async def _ready(self, database: Database) -> None:
        if self.url not in _ensured:
            await ensure_tables(database)
            _ensured.add(self.url)
        # reachable before any get; autocommit: a probe holds no transaction open
        async with database.reader.connect() as connection:
            await connection.execute(select(1))

    async def _file(self, database: Database) -> int:
        """Move what has landed into the store; the number of rows written."""
        from aura.config import get_settings

        settings = get_settings()
        channel = self.connection.channel()
        written = 0
        try:
            dead_letter_queue()(channel).declare()
            while True:
                batch: list[_Landed] = []
                while len(batch) < self.batch:
                    raw = channel.basic_get(queue=DEAD_LETTER_QUEUE, no_ack=False)
                    if raw is None:
                        break
                    batch.append(_landed(raw))
                if not batch:
                    break
                rows = [_to_row(landed, self.app) for landed in batch]
                async with database.engine.begin() as connection:
                    written += await file_letters(connection, database.dialect, self.source, rows)
                for landed in batch:  # committed: now they may leave the broker
                    channel.basic_ack(landed.delivery_tag)
                if len(batch) < self.batch:
                    break
            if not written and settings.dlq_retention_days <= 0:
                return 0  # nothing new: the count bound has nothing new to bound
            async with database.engine.begin() as connection:
                dropped = await enforce_retention(
                    connection,
                    self.source,
                    max_letters=settings.dlq_retention_letters,
                    max_age_days=settings.dlq_retention_days,
                )
            for reason, count in dropped.items():
                self.dropped[reason] = self.dropped.get(reason, 0) + count
                events.emit(DeadLettersDropped(reason, count))
            if dropped:
                _log.warning("DLQ retention removed dead letters", dropped=dropped)
        finally:
            with contextlib.suppress(Exception):
                channel.close()  # whatever was not acked goes back to the broker queue
        return written

    def _session(
        self, work: Callable[[Database], Coroutine[Any, Any, T]], *, file_first: bool = True
    ) -> T:
        """Reach the store, file what has landed (unless ``work`` is the filing), run
        ``work`` on its own loop and let the store go."""

        async def run() -> T:
            database = self._database()
            try:
                try:
                    await self._ready(database)
                except Exception as exc:
                    from aura.config import mask_url

                    raise ServiceUnavailableError(
                        f"the DLQ store at {mask_url(self.url)} cannot be reached: "
                        f"{describe_exception(exc)}"
                    ) from exc
                if file_first:
                    await self._file(database)
                return await work(database)
            finally:
                await database.dispose()

        return run_in_own_loop(run)

    def file(self) -> int:
        """File what has landed; the number of new letters."""
        return self._session(self._file, file_first=False)

    # -- reads ------------------------------------------------------------------------

    def list(
        self,
        *,
        reason: str | None = None,
        task: str | None = None,
        queue: str | None = None,
        tenant: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 50,
        after: int | None = None,
        raw: bool = False,
    ) -> builtins.list[DeadLetter]:  # builtins: "list" is this method inside the class
        """Matching dead letters, oldest first, one per fate; ``after``: the ``seq`` of
        the last letter of the previous page. ``raw``: malformed originals carry their
        bytes (``letter.original.raw()``)."""
        where = Filter(reason, task, queue, tenant, since, until).clauses(self.source)
        if after is not None:
            where.append(dead_letters.c.seq > after)
        columns: builtins.list[Any] = list(LISTED)
        if raw:  # the bytes of malformed originals only: nothing else is read from them
            body = case((dead_letters.c.kind == "original", dead_letters.c.body), else_=None)
            columns.append(body.label("body"))

        async def read(database: Database) -> builtins.list[DeadLetter]:
            statement = select(*columns).where(*where).order_by(dead_letters.c.seq).limit(limit)
            async with database.reader.connect() as connection:
                rows = (await connection.execute(statement)).all()
            return [_letter_of(row) for row in rows]

        return self._session(read)

    def count(
        self,
        *,
        reason: str | None = None,
        task: str | None = None,
        queue: str | None = None,
        tenant: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> int:
        """How many dead letters match."""
        where = Filter(reason, task, queue, tenant, since, until).clauses(self.source)

        async def read(database: Database) -> int:
            async with database.reader.connect() as connection:
                found = await connection.scalar(select(func.count()).where(*where))
            return int(found or 0)

        return self._session(read)

    def count_by_reason(self) -> dict[str, int]:
        """Dead letters by reason, one per fate."""
        where = Filter().clauses(self.source)
        c = dead_letters.c

        async def read(database: Database) -> dict[str, int]:
            async with database.reader.connect() as connection:
                rows = await connection.execute(
                    select(c.reason, func.count()).where(*where).group_by(c.reason)
                )
                return {str(reason): int(n) for reason, n in rows}

        return self._session(read)

    def show(self, letter_id: str) -> DeadLetter | None:
        """The dead letter with this id (as ``ls`` prints it), dead or replayed."""
        c = dead_letters.c

        async def read(database: Database) -> DeadLetter | None:
            async with database.reader.connect() as connection:
                row = (
                    await connection.execute(
                        select(*LISTED).where(c.source == self.source, c.letter_id == letter_id)
                    )
                ).first()
            return _letter_of(row) if row is not None else None

        return self._session(read)

    def replays(self, letter_id: str | None = None) -> builtins.list[dict[str, Any]]:
        """The replay record: who replayed which letter, when, to which queue."""
        c = replays.c
        where = [c.source == self.source]
        if letter_id is not None:
            where.append(c.letter_id == letter_id)

        async def read(database: Database) -> builtins.list[dict[str, Any]]:
            async with database.reader.connect() as connection:
                rows = await connection.execute(select(replays).where(*where).order_by(c.id))
                return [dict(row._mapping) for row in rows]

        return self._session(read)

    # -- changes ----------------------------------------------------------------------

    def purge(self, *, reason: str) -> int:
        """Remove the dead letters with ``reason``; every other letter stays."""
        c = dead_letters.c

        async def remove(database: Database) -> int:
            async with database.engine.begin() as connection:
                result = await connection.execute(
                    delete(dead_letters).where(
                        c.source == self.source, c.status == DEAD, c.reason == reason
                    )
                )
            return int(result.rowcount or 0)

        return self._session(remove)

    def replay(
        self,
        *,
        letter_id: str | None = None,
        reason: str | None = None,
        task: str | None = None,
        queue: str | None = None,
        tenant: str | None = None,
        to_queue: str | None = None,
        operator: str = "",
        check: ReplayCheck | None = None,
        limit: int = 10_000,
    ) -> ReplayReport:
        """Send dead letters back to the queue each came from (``to_queue`` overrides),
        with a fresh retry budget and their replay count: the one ``letter_id`` names, or
        those the filters select (``reason``, ``task``, ``queue``, ``tenant``; at least
        one). A letter is claimed in the store (one operator wins), published with a
        confirm, and marked replayed in the same transaction: replaying twice, or from two
        places at once, enqueues it once. Refused (with the reason, the letter stays): a
        malformed original, a forged or oversized letter, an unknown origin, a queue that
        does not exist, or what ``check`` says (default: ``task_checks(app)``)."""
        selected = (reason, task, queue, tenant)
        if (letter_id is None) == all(value is None for value in selected):
            raise ValueError("replay needs a dead letter id or a reason, not both")
        c = dead_letters.c
        if letter_id is not None:
            where = [c.source == self.source, c.status == DEAD, c.letter_id == letter_id]
        else:
            where = Filter(reason, task, queue, tenant).clauses(self.source)
        report = ReplayReport()

        async def run(database: Database) -> ReplayReport:
            async with database.reader.connect() as connection:
                seqs = (
                    await connection.scalars(
                        select(c.seq).where(*where).order_by(c.seq).limit(limit)
                    )
                ).all()
            for seq in seqs:
                await self._replay_one(database, seq, to_queue, operator, check, report)
            return report

        return self._session(run)

    async def _replay_one(
        self,
        database: Database,
        seq: int,
        to_queue: str | None,
        operator: str,
        check: ReplayCheck | None,
        report: ReplayReport,
    ) -> None:
        c = dead_letters.c
        async with database.engine.begin() as connection:
            # The claim: a row only one transaction can move out of "dead".
            claimed = await connection.execute(
                update(dead_letters)
                .where(c.seq == seq, c.status == DEAD)
                .values(status=REPLAYED)
                .returning(*LISTED, c.body, c.properties)
            )
            row = claimed.first()
            if row is None:
                return  # another operator replayed it first
            letter = _letter_of(row)
            queue = to_queue or letter.queue
            try:
                args, kwargs = _replayed_arguments(row)
            except Exception as exc:
                args, kwargs = [], {}
                letter.replay_refusal = f"its arguments cannot be read: {type(exc).__name__}"
            letter.task_args, letter.task_kwargs = args, kwargs  # checks see them whole
            checks = check if check is not None else task_checks(self.app)
            refusal = (
                row.refusal
                or letter.replay_refusal
                or _replay_refusal(letter, queue, row.body_size, checks)
            )
            if refusal is None:
                refusal = self._queue_missing(queue)
            if refusal is not None:
                await connection.rollback()
                report.refused.append((letter, refusal))
                return
            count = letter.replay_count + 1
            await asyncio.to_thread(
                publish_replay, self.connection, letter, queue, args, kwargs, count
            )
            await mark_replayed(
                connection,
                seq,
                replay_count=count,
                operator=operator or _operator(),
                to_queue=queue,
                letter_id=letter.id,
                message_id=letter.message_id,
                source=self.source,
            )
        letter.replay_count = count
        report.replayed.append(letter)

    def _queue_missing(self, queue: str) -> str | None:
        channel = self.connection.channel()
        try:
            channel.queue_declare(queue=queue, passive=True)
        except Exception as exc:
            return f"queue {queue!r} does not exist on this broker ({describe_exception(exc)})"
        finally:
            with contextlib.suppress(Exception):
                channel.close()
        return None


def task_checks(app: Any) -> ReplayCheck:
    """The replay checks ``app``'s tasks bring: the arguments bind to the task, the tenant
    in them is the one the letter is filed under, and the task's own
    ``aura_replay_check(args, kwargs)`` (the platform's ingest: the gateway's record size
    limit). A task ``app`` does not know gets the generic checks only."""

    def check(letter: DeadLetter) -> str | None:
        task = _registered(app, letter.task)
        if task is None:
            return None
        signature = getattr(task, "aura_signature", None)
        if signature is not None:
            try:
                bound = signature.bind(*letter.task_args, **letter.task_kwargs)
            except TypeError as exc:
                return f"its arguments do not fit {letter.task}: {bounded_text(str(exc), 200)}"
            tenant = bound.arguments.get("tenant_id")
            filed = letter.tenant_id
            if tenant is not None and filed is not None and str(tenant) != filed:
                return (
                    f"forged: filed under tenant {bounded_text(filed, 64)!r} "
                    f"but its arguments are for tenant {bounded_text(str(tenant), 64)!r}"
                )
        own = getattr(task, "aura_replay_check", None)
        if callable(own):
            found = own(list(letter.task_args), dict(letter.task_kwargs))
            return str(found) if found else None
        return None

    return check


def _operator() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


MAX_REPLAY_BYTES = 32 * 1024 * 1024
"""The largest letter replay sends (the envelope guard's message size limit)."""


def _replay_refusal(
    letter: DeadLetter, queue: str, size: int, check: ReplayCheck | None
) -> str | None:
    if letter.original is not None:
        return "a malformed message cannot be replayed: fix its producer and send it again"
    if not queue:
        return "its origin queue is unknown: give one with --to QUEUE"
    if not letter.message_id or not letter.task:
        return "it names no message id or task to replay"
    if size > MAX_REPLAY_BYTES:
        return f"oversized: {size} bytes, more than a message may hold ({MAX_REPLAY_BYTES})"
    return check(letter) if check is not None else None


def _replayed_arguments(row: Any) -> tuple[list[Any], dict[str, Any]]:
    """The arguments to send, whole, from the bytes that landed: a broker-dead-lettered
    message's own body (Aura never rewrote it), else the letter's (redacted when it was
    written)."""
    if row.kind == "broker":
        args, kwargs, _embed = json.loads(bytes(row.body))
        return list(args), dict(kwargs)
    written = DeadLetter.model_validate_json(bytes(row.body))
    return list(written.task_args), dict(written.task_kwargs)


def publish_replay(
    connection: Connection,
    letter: DeadLetter,
    queue: str,
    args: list[Any],
    kwargs: dict[str, Any],
    replay_count: int,
) -> None:
    """Publish ``letter`` as a Celery protocol 2 message straight to ``queue`` (the
    default exchange, so any app's queue works without knowing its bindings) and wait
    for the broker's confirm."""
    message_id = letter.message_id
    headers = {
        "lang": "py",
        "task": letter.task,
        "id": message_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": message_id,
        "parent_id": None,
        "argsrepr": bounded_text(repr(args), 200),
        "kwargsrepr": bounded_text(repr(kwargs), 200),
        "origin": "aura dlq replay",
        "ignore_result": False,
        REPLAY_HEADER: replay_count,
    }
    body = [args, kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    channel = connection.channel()
    try:
        if hasattr(channel, "basic_publish_confirm"):  # py-amqp: wait for the confirm
            channel.basic_publish = channel.basic_publish_confirm
        Producer(channel).publish(
            body,
            exchange="",
            routing_key=queue,
            serializer="json",
            headers=headers,
            delivery_mode="persistent",
            correlation_id=message_id,
            retry=False,
        )
    finally:
        with contextlib.suppress(Exception):
            channel.close()


_DELAY_BITS = re.compile(r"(?:[01]\.){28}")  # kombu's native delayed delivery's prefix


def delayed_by_broker(delivery_info: dict[str, Any] | None) -> bool:
    """Whether this delivery came through kombu's native delayed delivery (its routing key
    starts with the 28 delay bits): the broker has already held it for its countdown."""
    return _DELAY_BITS.match(str((delivery_info or {}).get("routing_key", ""))) is not None


def queue_of(delivery_info: dict[str, Any] | None) -> str:
    """The work queue a delivery came from: its routing key, less the 28 delay bits a
    delayed retry's routing key starts with (a queue name may hold dots itself)."""
    routing_key = str((delivery_info or {}).get("routing_key", ""))
    found = _DELAY_BITS.match(routing_key)
    return routing_key[found.end() :] if found else routing_key


def replay(reader: DeadLetterQueue, **options: Any) -> ReplayReport:
    """``reader.replay(**options)``: see ``DeadLetterQueue.replay``."""
    return reader.replay(**options)


def purge(reader: DeadLetterQueue, *, reason: str) -> int:
    """Remove the dead letters with ``reason``; every other letter stays."""
    return reader.purge(reason=reason)
