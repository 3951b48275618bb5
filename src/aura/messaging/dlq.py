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
original``), so nothing about it is lost; readers redact its text when they render it,
and it cannot be replayed (its producer must be fixed).

One fate, one letter: a dead letter for a message id and reason is written once where the
writer can tell (``resilient_task`` keeps a marker in Redis after the confirm), and the
reader counts one entry per message id and reason whatever the queue holds (a crash
between the confirm and the ack, or Redis down, can write a second copy).

``route_to_dlq`` waits for the broker's publisher confirm before it returns, so a caller
acks the original only once the dead letter is safe: a crash in between duplicates the
dead letter, never loses it. Error texts and arguments are redacted before they are
written: secrets never reach the DLQ.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import json
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

import structlog
from kombu.connection import Connection
from pydantic import BaseModel, Field

from aura import events
from aura.events import DeadLetterReason, MessageDeadLettered
from aura.logs import bounded_text, describe_exception, redact
from aura.messaging.topology import DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, dead_letter_queue

__all__ = [
    "DeadLetter",
    "DeadLetterQueue",
    "OriginalMessage",
    "StoredDeadLetter",
    "dead_letter_original",
    "publish_dead_letter",
    "purge",
    "queue_of",
    "replay",
    "route_to_dlq",
]

_MAX_ERROR = 1000
_log = structlog.get_logger("aura.messaging.dlq")
MAX_SCAN = 100_000
_ORIGINAL_FORMAT = "original"  # x-aura-format of a malformed message kept as it arrived
_MAX_HEADER_DEPTH = 8
# Headers kombu acts on when it builds a message (a compression header makes it inflate the
# body, and fail on one that is not compressed): a malformed original keeps them renamed,
# or the DLQ itself could not be read.
_DISARMED = ("compression",)


class OriginalMessage(BaseModel):
    """A malformed message as it arrived: its bytes (text if they are UTF-8, else
    base64), content type and encoding, and its headers (rendered as JSON)."""

    body: str
    body_encoding: Literal["utf-8", "base64"]
    size: int
    content_type: str | None = None
    content_encoding: str | None = None
    headers: dict[str, Any] = Field(default_factory=dict)

    def raw(self) -> bytes:
        if self.body_encoding == "base64":
            return base64.b64decode(self.body)
        return self.body.encode("utf-8")


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
    return value[:limit] if isinstance(value, str) else ""


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


def _original_from_message(message: Any, headers: dict[str, Any]) -> DeadLetter:
    body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
    try:
        text, encoding = body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(body).decode("ascii"), "base64"
    at_text = headers.get("x-aura-dead-lettered-at")
    try:
        at = datetime.fromisoformat(at_text) if isinstance(at_text, str) else datetime.now(UTC)
    except ValueError:
        at = datetime.now(UTC)
    original = OriginalMessage(
        body=text,
        body_encoding=encoding,
        size=len(body),
        content_type=str(headers.get("x-aura-original-content-type") or "") or None,
        content_encoding=str(headers.get("x-aura-original-content-encoding") or "") or None,
        headers=_json_safe(
            {k: v for k, v in headers.items() if not _added_by_dead_lettering(k)}
            | {
                name: headers[f"x-aura-original-{name}"]
                for name in _DISARMED
                if f"x-aura-original-{name}" in headers
            }
        ),
    )
    reason_text = str(headers.get("x-aura-reason", DeadLetterReason.MALFORMED_MESSAGE.value))
    try:
        reason = DeadLetterReason(reason_text)
    except ValueError:
        reason = DeadLetterReason.MALFORMED_MESSAGE
    return DeadLetter(
        id=str(message.properties.get("message_id") or uuid.uuid4().hex),
        message_id=_safe_id(headers.get("id")),
        reason=reason,
        task=_bounded(headers.get("task")),
        queue=_bounded(headers.get("x-aura-queue")),
        error_type=_bounded(headers.get("x-aura-kind")),
        error=_bounded(headers.get("x-aura-error"), _MAX_ERROR),
        first_failure_at=at,
        last_failure_at=at,
        dead_lettered_at=at,
        original=original,
    )


@dataclass
class StoredDeadLetter:
    """A DLQ entry as the reader sees it, with the broker message it came from."""

    letter: DeadLetter
    message: Any  # kombu.Message, unacknowledged while the reader holds it
    from_broker: bool  # dead-lettered by the broker's delivery limit, not by Aura


def _from_message(message: Any) -> DeadLetter:
    """Any DLQ entry as a ``DeadLetter``: never raises, whatever the queue holds."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    try:
        if headers.get("x-aura-format") == _ORIGINAL_FORMAT:
            return _original_from_message(message, headers)
        if "x-aura-reason" in headers:
            return DeadLetter.model_validate(json.loads(message.body))
        return _from_broker(message, headers)
    except Exception as exc:  # an entry nobody here wrote: show it, do not fail the read
        return _original_from_message(
            message,
            {
                **headers,
                "x-aura-reason": DeadLetterReason.MALFORMED_MESSAGE.value,
                "x-aura-kind": "unreadable_dead_letter",
                "x-aura-error": f"this DLQ entry cannot be read: {type(exc).__name__}",
            },
        )


def _from_broker(message: Any, headers: dict[str, Any]) -> DeadLetter:
    # A Celery message dead-lettered by the broker (delivery limit): protocol 2 body.
    deaths = headers.get("x-death") or [{}]
    death = deaths[0]
    broker_reason = str(headers.get("x-first-death-reason", death.get("reason", "unknown")))
    reason = (
        DeadLetterReason.WORKER_LOST
        if broker_reason == "delivery_limit"
        else DeadLetterReason.TASK_FAILED
    )
    try:
        args, kwargs, _embed = json.loads(message.body)
    except (ValueError, TypeError):
        args, kwargs = [message.body if isinstance(message.body, str) else repr(message.body)], {}
    when = death.get("time")
    at = when if isinstance(when, datetime) else datetime.now(UTC)
    return DeadLetter(
        id=str(headers.get("id") or message.properties.get("message_id") or uuid.uuid4().hex),
        message_id=str(headers.get("id", "")),
        reason=reason,
        task=str(headers.get("task", "")),
        queue=str(death.get("queue", "")),
        task_args=list(args),
        task_kwargs=dict(kwargs),
        error_type="WorkerLost" if reason is DeadLetterReason.WORKER_LOST else "Rejected",
        error=f"dead-lettered by the broker: {broker_reason}",
        retries=int(death.get("count", 0)),
        first_failure_at=at,
        last_failure_at=at,
    )


class DeadLetterQueue:
    """Read, replay and purge the DLQ. Entries are held unacknowledged while read and
    returned to the queue afterwards, unless this reader removed them on purpose."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    @contextmanager
    def _session(self, scan: int) -> Iterator[list[StoredDeadLetter]]:
        if not 1 <= scan <= MAX_SCAN:
            raise ValueError(f"scan must be between 1 and {MAX_SCAN}, got {scan}")
        channel = self.connection.channel()
        held: list[StoredDeadLetter] = []
        try:
            queue = dead_letter_queue()(channel)
            queue.declare()
            for _ in range(scan):
                try:
                    message = queue.get(no_ack=False, accept=["json"])
                except Exception as exc:  # kombu could not even build it: it stays
                    _log.warning(  # unacked (back to the queue on close); read on past it
                        "a DLQ entry could not be read", error=describe_exception(exc)
                    )
                    continue
                if message is None:
                    break
                letter = _from_message(message)
                held.append(
                    StoredDeadLetter(letter, message, "x-aura-reason" not in message.headers)
                )
            yield held
        finally:
            if not getattr(channel, "do_restore", True):
                # kombu's in-memory transport drops unacked messages on close instead of
                # requeueing them as RabbitMQ does: put back what was only read.
                for entry in held:
                    if not entry.message.acknowledged:
                        entry.message.reject(requeue=True)
            channel.close()  # whatever was not acked goes back to the queue

    def list(
        self,
        *,
        reason: str | None = None,
        task: str | None = None,
        tenant: str | None = None,
        limit: int = 50,
        scan: int = 10_000,
    ) -> builtins.list[DeadLetter]:  # builtins: "list" is this method inside the class
        """Matching dead letters, oldest first, one per message id and reason."""
        with self._session(scan) as held:
            found = [
                letter
                for letter in _one_per_fate(entry.letter for entry in held)
                if _matches(letter, reason=reason, task=task, tenant=tenant)
            ]
        return found[:limit]

    def count_by_reason(self, *, scan: int = 10_000) -> dict[str, int]:
        """Dead letters by reason, one per message id and reason."""
        counts: dict[str, int] = {}
        with self._session(scan) as held:
            for letter in _one_per_fate(entry.letter for entry in held):
                counts[letter.reason.value] = counts.get(letter.reason.value, 0) + 1
        return counts

    def show(self, letter_id: str, *, scan: int = 10_000) -> DeadLetter | None:
        with self._session(scan) as held:
            return next((e.letter for e in held if e.letter.id == letter_id), None)

    def take(
        self,
        *,
        letter_id: str | None = None,
        reason: str | None = None,
        scan: int = 10_000,
    ) -> Iterator[StoredDeadLetter]:
        """Yield matching entries; one is removed only if the caller acks its message."""
        with self._session(scan) as held:
            for entry in held:
                if letter_id is not None and entry.letter.id != letter_id:
                    continue
                if reason is not None and entry.letter.reason.value != reason:
                    continue
                yield entry


def queue_of(delivery_info: dict[str, Any] | None) -> str:
    """The work queue a delivery came from (a delayed retry's routing key ends with it)."""
    routing_key = str((delivery_info or {}).get("routing_key", ""))
    return routing_key.rsplit(".", 1)[-1]


def replay(
    reader: DeadLetterQueue,
    send: Callable[[DeadLetter], None],
    *,
    letter_id: str | None = None,
    reason: str | None = None,
    scan: int = 10_000,
) -> list[DeadLetter]:
    """Send matching dead letters back to their queues; each leaves the DLQ only after
    ``send`` returned (a confirmed publish), so a failure midway loses nothing."""
    if letter_id is None and reason is None:
        raise ValueError("replay needs a dead letter id or a reason")
    replayed: list[DeadLetter] = []
    sent: set[tuple[str, str, str]] = set()
    for entry in reader.take(letter_id=letter_id, reason=reason, scan=scan):
        if entry.letter.original is not None:
            continue  # a malformed message stays: replaying it would fail the same way
        if entry.letter.fate_key not in sent:  # a second copy of one fate is sent once
            send(entry.letter)
            sent.add(entry.letter.fate_key)
            replayed.append(entry.letter)
        entry.message.ack()
    return replayed


def purge(reader: DeadLetterQueue, *, reason: str, scan: int = 10_000) -> list[DeadLetter]:
    """Remove the dead letters with ``reason``; every other entry stays."""
    removed: list[DeadLetter] = []
    for entry in reader.take(reason=reason, scan=scan):
        entry.message.ack()
        removed.append(entry.letter)
    return removed


def _one_per_fate(letters: Iterable[DeadLetter]) -> Iterator[DeadLetter]:
    seen: set[tuple[str, str, str]] = set()
    for letter in letters:
        if letter.fate_key not in seen:
            seen.add(letter.fate_key)
            yield letter


def _matches(
    letter: DeadLetter, *, reason: str | None, task: str | None, tenant: str | None
) -> bool:
    return (
        (reason is None or letter.reason.value == reason)
        and (task is None or letter.task == task)
        and (tenant is None or letter.tenant_id == tenant)
    )
