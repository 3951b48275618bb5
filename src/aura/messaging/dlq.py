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

``route_to_dlq`` waits for the broker's publisher confirm before it returns, so a caller
acks the original only once the dead letter is safe: a crash in between duplicates the
dead letter, never loses it. Error texts and arguments are redacted before they are
written: secrets never reach the DLQ.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kombu.connection import Connection
from pydantic import BaseModel, Field

from aura import events
from aura.events import DeadLetterReason, MessageDeadLettered
from aura.logs import redact, redact_text
from aura.messaging.topology import DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, dead_letter_queue

__all__ = [
    "DeadLetter",
    "DeadLetterQueue",
    "StoredDeadLetter",
    "purge",
    "queue_of",
    "replay",
    "route_to_dlq",
]

_MAX_ERROR = 1000
MAX_SCAN = 100_000


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


def _publish_confirmed(connection: Connection, letter: DeadLetter) -> None:
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
        error=redact_text(" ".join(str(error_text or error or "").split()))[:_MAX_ERROR],
        retries=retries,
        first_failure_at=first_failure_at or now,
        last_failure_at=now,
        tenant_id=tenant_id,
    )
    await asyncio.to_thread(_publish_confirmed, connection, letter)
    events.emit(MessageDeadLettered(letter.reason, task))
    return letter


@dataclass
class StoredDeadLetter:
    """A DLQ entry as the reader sees it, with the broker message it came from."""

    letter: DeadLetter
    message: Any  # kombu.Message, unacknowledged while the reader holds it
    from_broker: bool  # dead-lettered by the broker's delivery limit, not by Aura


def _from_message(message: Any) -> DeadLetter:
    headers = message.headers or {}
    if "x-aura-reason" in headers:
        return DeadLetter.model_validate(json.loads(message.body))
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
                message = queue.get(no_ack=False, accept=["json"])
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
    ) -> list[DeadLetter]:
        with self._session(scan) as held:
            found = [
                entry.letter
                for entry in held
                if _matches(entry.letter, reason=reason, task=task, tenant=tenant)
            ]
        return found[:limit]

    def count_by_reason(self, *, scan: int = 10_000) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self._session(scan) as held:
            for entry in held:
                counts[entry.letter.reason.value] = counts.get(entry.letter.reason.value, 0) + 1
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
    for entry in reader.take(letter_id=letter_id, reason=reason, scan=scan):
        send(entry.letter)
        entry.message.ack()
        replayed.append(entry.letter)
    return replayed


def purge(reader: DeadLetterQueue, *, reason: str, scan: int = 10_000) -> list[DeadLetter]:
    """Remove the dead letters with ``reason``; every other entry stays."""
    removed: list[DeadLetter] = []
    for entry in reader.take(reason=reason, scan=scan):
        entry.message.ack()
        removed.append(entry.letter)
    return removed


def _matches(
    letter: DeadLetter, *, reason: str | None, task: str | None, tenant: str | None
) -> bool:
    return (
        (reason is None or letter.reason.value == reason)
        and (task is None or letter.task == task)
        and (tenant is None or letter.tenant_id == tenant)
    )
