"""Carrying out a delivery's fate: the ack of a committed twin, a retry or deferral
through the broker, a dead letter published with a confirm.

A dead letter is published with a publisher confirm before the task returns, and Celery
acks the original (late) only after that: never lost, at worst duplicated in the DLQ.
The DLQ store keeps one letter per (message id, reason, fingerprint), so a redelivery
that fails the same way writes the same letter again harmlessly. A letter that cannot be
published puts the message back on its queue (never acked, never rejected away); so does
a retry that cannot be published.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NoReturn

import structlog
from celery import Task
from celery.exceptions import Ignore, Reject, Retry

from aura import events
from aura.db import while_out
from aura.errors import AuraError, DeadLettered
from aura.events import (
    DeadLetterReason,
    DuplicateDelivered,
    DuplicateKind,
    Reason,
    RetryKind,
    TaskRetried,
)
from aura.logs import describe_exception
from aura.messaging._bounded import PUBLISH_BOUND, PublishTimeout, publish_within
from aura.messaging._idempotency import InboxEntry
from aura.messaging._retry import KEY_PREFIX
from aura.messaging._runtime import call_off_loop
from aura.messaging.delivery import (
    FAILURES_HEADER,
    TENANT_HEADER,
    Delivery,
    failures_so_far,
    replay_count_of,
    tenant_header_of,
)
from aura.messaging.dlq import REPLAY_HEADER, DeadLetter, queue_of, route_to_dlq
from aura.messaging.fate import (
    Ack,
    DeadLetterAs,
    DeferAfter,
    Fail,
    Fate,
    HoldForDatabase,
    RetryAfter,
    first_fate,
)
from aura.messaging.rules import DEFER_PREFIX, deferrals_spent, outage_countdown

__all__ = [
    "DatabaseOut",
    "carry_out",
    "count_duplicate",
    "forget_counts",
    "retry",
    "settle_failure",
]

_log = structlog.get_logger("aura.messaging.settle")
_HOOK_BOUND = 60.0  # seconds a hook after a fate is tried again while the database is out


class DatabaseOut(AuraError):  # a signal inside the delivery loop, never raised out of it
    """The database could not be reached for this delivery (before or during its work)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def settle_failure(delivery: Delivery, error: Exception) -> None:
    """The task raised ``error``: ask the rules, carry out the first fate (or raise)."""
    fate = first_fate(
        delivery.policy.rules, lambda rule: rule.on_failure(delivery, error), delivery
    )
    carry_out(delivery, fate if fate is not None else Fail(error))


def carry_out(delivery: Delivery, fate: Fate) -> None:
    """Returns only for an ack; every other fate raises what Celery must see."""
    if isinstance(fate, Ack):
        _acknowledge_duplicate(delivery, fate)
    elif isinstance(fate, RetryAfter):
        events.emit(TaskRetried(delivery.name, RetryKind.RETRY))
        _log.warning(
            "task failed; retrying",
            task=delivery.name,
            message_id=delivery.message_id,
            attempt=fate.failures,
            countdown=round(fate.countdown, 3),
            error=describe_exception(fate.error),
        )
        retry(delivery.task, fate.error, fate.countdown, failures=fate.failures)
    elif isinstance(fate, DeferAfter):
        if fate.counted:
            events.emit(TaskRetried(delivery.name, RetryKind.DEFERRAL))
        retry(delivery.task, fate.error, fate.countdown, deferral=True)
    elif isinstance(fate, DeadLetterAs):
        _dead_letter(delivery, fate)
    elif isinstance(fate, HoldForDatabase):
        raise DatabaseOut(fate.error) from fate.error
    else:
        raise fate.error


def _acknowledge_duplicate(delivery: Delivery, fate: Ack) -> None:
    """The effect is committed: redo recovery steps only, clear counters, ack. A failed
    recovery step is settled like any failure (never dead-lettered: the inbox is read
    before every letter, and shows it committed)."""
    hook = delivery.policy.on_duplicate
    if fate.recover and hook is not None:
        try:
            delivery.run(hook(*delivery.args, **delivery.kwargs))
        except (Retry, Ignore, Reject):
            raise
        except Exception as exc:
            settle_failure(delivery, exc)
            return
    forget_counts(delivery)
    count_duplicate(delivery.request)
    _log.info(
        "effect already committed; delivery acked without running",
        task=delivery.name,
        message_id=delivery.message_id,
    )


def count_duplicate(request: Any) -> None:
    """This delivery's effect was already committed: its outcome is ``duplicate``."""
    request.aura_duplicate = True
    events.emit(DuplicateDelivered(DuplicateKind.COMMITTED))


def _dead_letter(delivery: Delivery, fate: DeadLetterAs) -> None:
    """Dead-letter this delivery -- unless the inbox shows its effect committed (then it
    is acked), or for another payload (then that is its reason)."""
    reason: Reason = fate.reason
    entry = _committed_entry(delivery, fate.error) if fate.check_inbox else None
    if entry is not None and not entry.matches(delivery.fingerprint):
        reason = DeadLetterReason.CONFLICTING_MESSAGE_ID
    elif entry is not None:
        count_duplicate(delivery.request)
        _log.warning(
            "effect already committed; acked, not dead-lettered",
            task=delivery.name,
            message_id=delivery.message_id,
            reason=reason.value,
        )
        forget_counts(delivery)
        return
    letter = _publish_letter(delivery, fate, reason)
    hook = delivery.policy.on_dead_letter
    if hook is not None:
        try:
            delivery.run(_hook_with_retries(hook, letter), hard_limited=False)
        except Exception as hook_error:  # the letter is safe; a failing hook must not undo it
            _log.error(
                "on_dead_letter hook failed",
                task=delivery.name,
                message_id=delivery.message_id,
                error=describe_exception(hook_error, 300),
            )
    forget_counts(delivery)  # its fate is the DLQ: no count outlives it
    _log.error(
        "message sent to the dead-letter queue",
        task=delivery.name,
        message_id=delivery.message_id,
        reason=reason.value,
        error=letter.error,
        dead_letter=letter.id,
        replay_count=letter.replay_count,
    )
    raise DeadLettered(f"dead-lettered ({reason.value}): {letter.error}", reason.value, letter.id)


def _publish_letter(delivery: Delivery, fate: DeadLetterAs, reason: Reason) -> DeadLetter:
    request = delivery.request
    try:
        with delivery.runtime.publishing() as connection:
            routed = route_to_dlq(
                delivery.message_id,
                reason,
                connection=connection,
                task=delivery.name,
                queue=queue_of(request.delivery_info),
                args=list(delivery.args),
                kwargs=delivery.kwargs,
                error=fate.error,
                error_text=fate.error_text,
                retries=fate.retries,
                tenant_id=delivery.tenant,
                fingerprint=delivery.fingerprint,
                replay_count=replay_count_of(request),
            )
            # Off the loop, bounded by its own clock, not the task's (a blocked broker).
            return delivery.run(publish_within(routed, PUBLISH_BOUND), hard_limited=False)
    except Exception as publish_error:  # not in the DLQ: never acked, never rejected away
        _log.warning(
            "could not publish the dead letter; the message goes back to its queue",
            task=delivery.name,
            message_id=delivery.message_id,
            reason=reason.value,
            error=describe_exception(publish_error, 300),
        )
        raise Reject("its dead letter could not be published", requeue=True) from publish_error


def _committed_entry(delivery: Delivery, error: BaseException) -> InboxEntry | None:
    """What the inbox holds committed under this delivery's id. If the inbox cannot be
    read, the answer is unknown: the delivery is put off (deferral budget) rather than
    dead-lettered on a guess; once that budget is spent it is dead-lettered (and logged)."""
    inbox = delivery.policy.inbox
    if inbox is None:
        return None
    try:
        return delivery.run(inbox.lookup(delivery.message_id))
    except Exception as lookup_error:
        text = describe_exception(lookup_error, 300)
        if deferrals_spent(delivery):
            _log.error("inbox unreadable and deferrals spent; dead-lettering", error=text)
            return None
        _log.warning(
            "inbox unreadable: cannot tell whether the effect is committed; put off",
            task=delivery.name,
            message_id=delivery.message_id,
            error=text,
        )
        carry_out(delivery, DeferAfter(outage_countdown(delivery), error, counted=False))
        raise AssertionError("unreachable") from None  # pragma: no cover - a deferral raises


async def _hook_with_retries(
    hook: Callable[[DeadLetter], Coroutine[Any, Any, None]],
    letter: DeadLetter,
    *,
    bound: float = _HOOK_BOUND,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """The hook after a fate, tried again while what it needs is unavailable (a database
    out of connections left import records ``pending`` forever: the hook failed once and
    was never tried again): every 0.25 s doubling to 1 s, for ``bound`` seconds in all,
    so it lands within a second of the database answering. Other errors are the hook's
    own and raise at once."""

    def tell(exc: BaseException, pause: float) -> None:
        _log.warning(
            "on_dead_letter hook failed; trying again",
            message_id=letter.message_id,
            pause=pause,
            error=describe_exception(exc, 300),
        )

    await while_out(
        lambda: hook(letter), patience=bound, first_pause=0.25, on_retry=tell, sleep=sleep
    )


def forget_counts(delivery: Delivery) -> None:
    """Clear the retry and deferral counters; best effort (their TTL ends them anyway).
    A Redis outage here must not fail a delivery whose effect is committed."""
    message_id = delivery.message_id
    try:
        keys = (KEY_PREFIX + message_id, DEFER_PREFIX + message_id)
        delivery.run(_await(delivery.runtime.redis.delete(*keys)))
    except Exception as exc:  # unreachable, a full pool, ...: never a reason to fail
        _log.warning(
            "could not clear the retry counters; their TTL ends them",
            message_id=message_id,
            error=describe_exception(exc, 300),
        )


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def retry(
    task: Task,
    exc: BaseException,
    countdown: float,
    *,
    failures: int | None = None,
    deferral: bool = False,
) -> NoReturn:
    """``task.retry``, except that a retry which cannot be published puts the message back.

    Celery answers a failed retry publish (the broker unreachable) with
    ``Reject(requeue=False)`` (``Task.retry`` in celery/app/task.py): on our work queues
    that dead-letters the message as ``task_failed`` though its effect may be committed
    (an ingest whose enrichment publish failed: its enrichment was then lost; seen in
    ``aura chaos partition-broker``). Requeued, it is delivered again and the inbox
    dedupes; the queue's delivery limit bounds how often."""
    request = getattr(task, "request", None)
    if deferral and request is not None:
        request.aura_deferred = True  # its outcome: deferred, no budget spent
    headers: dict[str, Any] = {
        FAILURES_HEADER: failures_so_far(request) if failures is None else failures
    }
    tenant = tenant_header_of(request)
    if tenant is not None:  # the retry is the same tenant's work (the pool's fair share)
        headers[TENANT_HEADER] = tenant
    replays = replay_count_of(request)
    if replays:  # a replayed message's retries are still that replay
        headers[REPLAY_HEADER] = replays
    options: dict[str, Any] = {"headers": headers}

    def publish() -> NoReturn:
        raise task.retry(exc=exc, countdown=countdown, **options)

    try:  # off the loop's thread: a blocked broker holds this delivery, not every task
        call_off_loop(publish)
    except Reject as reject:
        if reject.requeue:
            raise
        raise Reject(reject.reason, requeue=True) from exc
    except PublishTimeout as timeout:
        raise Reject(f"its retry could not be published: {timeout}", requeue=True) from exc
    raise AssertionError("unreachable")  # pragma: no cover - publish() always raises
