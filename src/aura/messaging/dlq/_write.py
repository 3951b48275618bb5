"""Writing to the DLQ: a dead letter (``route_to_dlq``, JSON) or a malformed message kept
as it arrived (``dead_letter_original``); each waits for the broker's publisher confirm,
so the caller acks the original only once the letter is safe."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

from kombu.connection import Connection

from aura import events
from aura.events import DeadLetterReason, MessageDeadLettered, Reason, dead_letter_reason
from aura.logs import redact
from aura.messaging.dlq._letter import DeadLetter, bounded, safe_id
from aura.messaging.dlq._letter import error_text as _error_text  # a parameter's name below
from aura.messaging.topology import DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, dead_letter_queue

ORIGINAL_FORMAT = "original"  # x-aura-format of a malformed message kept as it arrived
# Headers kombu acts on when it builds a message (a compression header makes it inflate the
# body, and fail on one that is not compressed): a malformed original keeps them renamed,
# or the DLQ itself could not be read.
DISARMED = ("compression",)


def _publish(connection: Connection, body: Any, **properties: Any) -> None:
    """Publish ``body`` to the DLQ, persistent, and wait for the confirm (blocking)."""
    with connection.Producer() as producer:
        producer.publish(
            body,
            exchange=DEAD_LETTER_EXCHANGE,
            routing_key=DEAD_LETTER_QUEUE,
            declare=[dead_letter_queue()],
            delivery_mode="persistent",
            retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
            **properties,
        )


def publish_dead_letter(connection: Connection, letter: DeadLetter) -> None:
    """Publish ``letter`` to the DLQ and wait for the broker's confirm (blocking)."""
    _publish(
        connection,
        letter.model_dump(mode="json"),
        serializer="json",
        message_id=letter.id,
        headers={"x-aura-reason": letter.reason.value, "x-aura-task": letter.task},
    )


async def route_to_dlq(
    message_id: str,
    reason: Reason | str,
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
        reason=dead_letter_reason(reason),
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


def _kept_headers(headers: dict[Any, Any]) -> dict[Any, Any]:
    """The original's headers, less any ``x-aura-*`` it forged, with the ones kombu would
    act on when the letter is read kept under another name."""
    kept = {k: v for k, v in headers.items() if not str(k).startswith("x-aura-")}
    for name in DISARMED:
        if name in kept:
            kept[f"x-aura-original-{name}"] = kept.pop(name)
    return kept


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
    now = datetime.now(UTC)
    letter_id = uuid.uuid4().hex
    text = _error_text(error, None)
    body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
    content_type = message.content_type or None
    content_encoding = message.content_encoding or None
    _publish(
        connection,
        body,
        content_type=content_type or "application/octet-stream",
        content_encoding=content_encoding or "binary",
        message_id=letter_id,
        headers={
            **_kept_headers(headers),
            "x-aura-format": ORIGINAL_FORMAT,
            "x-aura-reason": reason.value,
            "x-aura-kind": kind,
            "x-aura-error": text,
            "x-aura-queue": queue,
            "x-aura-dead-lettered-at": now.isoformat(),
            "x-aura-original-content-type": content_type or "",
            "x-aura-original-content-encoding": content_encoding or "",
        },
    )
    events.emit(MessageDeadLettered(reason, ""))  # no task label: the name is untrusted
    return DeadLetter(
        id=letter_id,
        message_id=safe_id(headers.get("id")),
        reason=reason,
        task=bounded(headers.get("task")),
        queue=queue,
        error_type=kind,
        error=text,
        first_failure_at=now,
        last_failure_at=now,
        dead_lettered_at=now,
    )
