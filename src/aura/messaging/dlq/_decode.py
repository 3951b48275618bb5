"""Any entry of the broker's DLQ as a ``DeadLetter``: Aura's JSON letters, malformed
originals kept as they arrived, and Celery messages the broker dead-lettered itself.
Whatever the queue holds is untrusted: decoding never raises, and every text is redacted
before it is bounded."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from aura.errors import ConfigurationError
from aura.events import DeadLetterReason, dead_letter_reason
from aura.logs import bounded_text, redact
from aura.messaging.dlq._letter import (
    MAX_ERROR,
    MAX_NAME,
    MAX_SHOWN_BODY,
    DeadLetter,
    OriginalMessage,
    bounded,
    replay_count,
    safe_id,
    safe_letter_id,
)
from aura.messaging.dlq._write import DISARMED, ORIGINAL_FORMAT

MAX_HEADER_DEPTH = 8


def json_safe(value: Any, depth: int = 0) -> Any:
    """AMQP header values (bytes, datetimes, decimals, nested tables) as JSON values."""
    if depth > MAX_HEADER_DEPTH:
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
        return {str(k): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v, depth + 1) for v in value]
    return repr(value)


def from_message(message: Any) -> tuple[DeadLetter, str]:
    """Any DLQ entry as a ``DeadLetter`` and its kind (``aura``, ``broker``,
    ``original``): never raises, whatever the queue holds."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    try:
        if headers.get("x-aura-format") == ORIGINAL_FORMAT:
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


def _added_by_dead_lettering(header: str) -> bool:
    """Headers Aura or the broker put on when the message was dead-lettered."""
    return header.startswith(("x-aura-", "x-death", "x-first-death-", "x-last-death-"))


def _shown_text(body: bytes, limit: int = MAX_SHOWN_BODY) -> tuple[str, bool]:
    """The first ``limit`` characters of ``body`` as text (bytes that are not UTF-8 shown
    as ``\\xNN``, never base64, so redaction sees what they say), redacted; cut?"""
    head = body[: limit * 4].decode("utf-8", "backslashreplace")
    return bounded_text(head, limit), len(head) > limit or len(body) > limit * 4


def _aware(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at


def _original(body: bytes, headers: dict[str, Any]) -> OriginalMessage:
    """The malformed message as views show it, its bytes kept for ``raw()``."""
    text, cut = _shown_text(body)
    original = OriginalMessage(
        body=text,
        body_encoding="utf-8",
        cut=cut,
        size=len(body),
        content_type=bounded(headers.get("x-aura-original-content-type")) or None,
        content_encoding=bounded(headers.get("x-aura-original-content-encoding")) or None,
        headers=_shown_headers(
            {k: v for k, v in headers.items() if not _added_by_dead_lettering(k)}
            | {
                name: headers[f"x-aura-original-{name}"]
                for name in DISARMED
                if f"x-aura-original-{name}" in headers
            }
        ),
    )
    original._raw = body
    return original


def _original_from_message(message: Any, headers: dict[str, Any]) -> DeadLetter:
    body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
    at_text = headers.get("x-aura-dead-lettered-at")
    try:
        at = datetime.fromisoformat(at_text) if isinstance(at_text, str) else datetime.now(UTC)
    except ValueError:
        at = datetime.now(UTC)
    at = _aware(at)
    reason_text = str(headers.get("x-aura-reason", DeadLetterReason.MALFORMED_MESSAGE.value))
    try:
        reason = dead_letter_reason(reason_text)
    except ConfigurationError:  # not a reason's shape: a letter forged or damaged
        reason = DeadLetterReason.MALFORMED_MESSAGE
    return DeadLetter(
        id=safe_letter_id(message.properties.get("message_id")),
        message_id=safe_id(headers.get("id")),
        reason=reason,
        task=bounded(headers.get("task")),
        queue=bounded(headers.get("x-aura-queue")),
        error_type=bounded(headers.get("x-aura-kind")),
        error=bounded(headers.get("x-aura-error"), MAX_ERROR),
        first_failure_at=at,
        last_failure_at=at,
        dead_lettered_at=at,
        replay_count=replay_count(headers),
        original=_original(body, headers),
    )


def _shown_headers(headers: dict[str, Any]) -> dict[str, Any]:
    """Headers as JSON, each name and value redacted before it is bounded."""
    safe = json_safe(headers)
    return {
        bounded_text(str(k), MAX_NAME): _bounded_value(v)
        for k, v in redact(safe).items()
        if isinstance(safe, dict)
    }


def _bounded_value(value: Any) -> Any:
    if isinstance(value, str):
        return bounded_text(value, MAX_ERROR)
    if isinstance(value, dict):
        return {bounded_text(str(k), MAX_NAME): _bounded_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_bounded_value(v) for v in value[:100]]
    return value


def _from_broker(message: Any, headers: dict[str, Any]) -> DeadLetter:
    # A Celery message dead-lettered by the broker (delivery limit, or rejected):
    # protocol 2 body; everything in it is untrusted and redacted like the rest.
    deaths = headers.get("x-death") or [{}]
    death = deaths[0] if isinstance(deaths, list) and deaths else {}
    death = death if isinstance(death, dict) else {}
    broker_reason = bounded(headers.get("x-first-death-reason", death.get("reason", "unknown")))
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
    at = _aware(when if isinstance(when, datetime) else datetime.now(UTC))
    count = death.get("count", 0)
    return DeadLetter(
        id=safe_letter_id(headers.get("id") or message.properties.get("message_id")),
        message_id=safe_id(headers.get("id")),
        reason=reason,
        task=bounded(headers.get("task")),
        queue=bounded(death.get("queue")),
        task_args=redact(args),
        task_kwargs=redact(kwargs),
        error_type="WorkerLost" if reason is DeadLetterReason.WORKER_LOST else "Rejected",
        error=f"dead-lettered by the broker: {broker_reason}",
        retries=count if isinstance(count, int) else 0,
        first_failure_at=at,
        last_failure_at=at,
        dead_lettered_at=at,
        replay_count=replay_count(headers),
    )
