"""``@resilient_task``: a Celery task whose every delivery ends in success, a retry or the DLQ.

Per delivery (the seed's "Error Handling Hierarchy")::

    success                 -> ack (the retry counter is cleared if it was used)
    poison pill             -> DLQ (poison_pill) at once, no retry spent -> ack
    CircuitOpenError        -> deferred until the breaker may let a trial through; spends
                               no retry budget; after ``max_deferrals`` -> DLQ
                               (max_deferrals_exceeded)
    anything else           -> RetryTracker.increment_and_check(task id)
                               -> retry with exponential backoff and jitter (Retry-After
                                  honoured), or, past max_retries -> DLQ
                                  (max_retries_exceeded)
    worker killed           -> redelivered (acks_late, reject_on_worker_lost); a
                               redelivery counts as a failure in the same budget, and
                               past it goes to the DLQ (worker_lost); the broker's
                               delivery limit dead-letters it too, should no run survive

A dead letter is published with a publisher confirm before the task returns, and Celery
acks the original (late) only after that: never lost, at worst duplicated in the DLQ.
A redelivery that fails the same way writes the same letter again: the DLQ store keeps one
letter per (message id, reason, fingerprint), so no Redis marker decides it (a marker
outlived a replay and acked the replayed message's next failure away: lost). A replayed
message (header ``aura_replay_count``) carries its count into its next dead letter and
into its retries.

With an ``inbox`` (see ``aura.messaging.idempotency``) each delivery is looked up before
it runs: a committed twin is acked without running (no external call), a committed
other payload under the same id is dead-lettered as ``conflicting_message_id``; and no
dead letter is written for a message whose effect the inbox shows committed (one whose id
it shows committed for another payload goes as ``conflicting_message_id``, however it
failed). ``lookup_first=False``: the task's own claim settles twins (see
``resilient_task``).

Redis is an optimisation of every step, never a condition of its fate: when it cannot
be reached, counting falls back to Celery's own ``request.retries``, clearing counters
after a success is skipped (their TTL ends them). A redelivery after a lost connection
is a redelivery: tasks are not cancelled on connection loss (they finish; the inbox
absorbs the twin).

``async def`` tasks run on one event loop per worker process, made after fork and kept
for the process's life (pooled database and Redis connections are bound to it). When
Celery's soft time limit fires, the coroutine is cancelled and awaited, so its cleanup
and rollbacks run before the timeout is handled as a transient failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar, overload

import structlog
from billiard.exceptions import SoftTimeLimitExceeded, WorkerLostError
from celery import Celery, Task
from celery.exceptions import Ignore, Reject, Retry

from aura import events
from aura.config import get_settings
from aura.db.transactional import is_outage, while_out
from aura.errors import (
    CircuitOpenError,
    ConflictingMessageIdError,
    DatabaseTransactionError,
    DeadLettered,
    LLMError,
    LLMHTTPStatusError,
    ServiceUnavailableError,
    cause_chain,
)
from aura.events import (
    DeadLetterReason,
    DuplicateDelivered,
    DuplicateKind,
    RetryKind,
    TaskFinished,
    TaskOutcome,
    TaskRedelivered,
    TaskRetried,
    TaskTimedOut,
    TimeoutKind,
)
from aura.logs import describe_exception
from aura.messaging.dlq import REPLAY_HEADER, DeadLetter, queue_of, route_to_dlq
from aura.messaging.idempotency import Inbox, InboxEntry, message_fingerprint
from aura.messaging.poison import PoisonPillDetector
from aura.messaging.retry import KEY_PREFIX
from aura.messaging.runtime import (
    PUBLISH_BOUND,
    ContextStack,
    HardTimeLimitExceeded,
    ProcessRuntime,
    PublishTimeout,
    call_off_loop,
    process_runtime,
    publish_within,
)

__all__ = [
    "DEFER_PREFIX",
    "backoff_delay",
    "process_loop",
    "report_duplicate",
    "resilient_task",
]

T = TypeVar("T")
_log = structlog.get_logger("aura.messaging.task")
DEFER_PREFIX = "defer_count:"
# A retried message carries its failures so far: with Redis unable to count, the budget
# is kept from this, not Celery's request.retries (which counts deferrals too: a message
# put off 3 times by an open breaker was dead-lettered on its first real failure).
FAILURES_HEADER = "aura_failures"
# RabbitMQ's native delayed delivery (how Celery delays retries on quorum queues) counts
# whole seconds, and refuses a countdown below one.
_MIN_COUNTDOWN = 1.0


def backoff_delay(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Seconds before retry ``attempt`` (1, 2, ...): exponential, capped, half jittered."""
    ceiling = min(cap, base * 2.0 ** min(max(attempt - 1, 0), 64))  # no float overflow
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


@dataclass(frozen=True)
class _Policy:
    max_retries: int
    poison_pill_detection: bool
    dlq_routing: bool
    backoff_base: float
    backoff_max: float
    max_deferrals: int
    detector: PoisonPillDetector
    on_dead_letter: Callable[[DeadLetter], Coroutine[Any, Any, None]] | None
    tenant_of: Callable[[tuple[Any, ...], dict[str, Any]], str | None]
    inbox: Inbox | None
    on_duplicate: Callable[..., Coroutine[Any, Any, None]] | None
    lookup_first: bool = True


_ProcessRuntime = ProcessRuntime


def _runtime(app: Celery) -> ProcessRuntime:
    return process_runtime(app)


def process_loop(app: Celery | None = None) -> asyncio.AbstractEventLoop:
    """This worker process's event loop (the one ``async def`` tasks run on)."""
    return _runtime(app if app is not None else _default_app()).loop


@overload
def resilient_task(fn: Callable[..., Any], /) -> Task: ...


@overload
def resilient_task(
    fn: None = None,
    *,
    bind: bool = True,
    max_retries: int | None = None,
    poison_pill_detection: bool = True,
    dlq_routing: bool = True,
    app: Celery | None = None,
    backoff_base: float = 1.0,
    backoff_max: float = 60.0,
    max_deferrals: int = 30,
    detector: PoisonPillDetector | None = None,
    on_dead_letter: Callable[[DeadLetter], Coroutine[Any, Any, None]] | None = None,
    inbox: Inbox | None = None,
    on_duplicate: Callable[..., Coroutine[Any, Any, None]] | None = None,
    lookup_first: bool = True,
    **celery_options: Any,
) -> Callable[[Callable[..., Any]], Task]: ...


def resilient_task(
    fn: Callable[..., Any] | None = None,
    *,
    bind: bool = True,
    max_retries: int | None = None,
    poison_pill_detection: bool = True,
    dlq_routing: bool = True,
    app: Celery | None = None,
    backoff_base: float = 1.0,
    backoff_max: float = 60.0,
    max_deferrals: int = 30,
    detector: PoisonPillDetector | None = None,
    on_dead_letter: Callable[[DeadLetter], Coroutine[Any, Any, None]] | None = None,
    inbox: Inbox | None = None,
    on_duplicate: Callable[..., Coroutine[Any, Any, None]] | None = None,
    lookup_first: bool = True,
    **celery_options: Any,
) -> Any:
    """Decorate a ``def`` or ``async def`` as a resilient Celery task (see the module doc).

    ``max_retries`` defaults to RETRY_TRACKER_MAX_RETRIES. ``max_deferrals`` bounds how
    often a task is put off while the LLM circuit is open (30 x the breaker's reset timeout,
    30 minutes with the seed's 60 s). ``on_dead_letter`` is awaited with each dead letter
    once it is safe in the DLQ (to mark the record failed, say); if it fails, that is
    logged and nothing else changes. ``inbox`` makes deliveries idempotent by id and
    payload (``aura.messaging.idempotency``); ``on_duplicate`` is awaited, with the
    task's arguments, when a delivery's effect is already committed (to redo a recovery
    step such as queueing follow-up work). ``lookup_first=False`` skips the inbox read
    before each delivery, for a task whose effect is one statement that claims the id and
    tells a committed twin itself (``aura.db.pipeline``): that read would be a second round
    trip for the same answer. Such a task raises ``ConflictingMessageIdError`` for another
    payload, and reports a twin with ``report_duplicate`` (``on_duplicate`` is not called:
    the task does its recovery steps itself); the inbox is still read before every dead
    letter. Other keyword arguments go to ``app.task`` (``name``, ``queue``,
    ``soft_time_limit``, ...).
    """

    def decorate(function: Callable[..., Any]) -> Task:
        celery = app if app is not None else _default_app()
        policy = _Policy(
            max_retries=get_settings().retry_tracker_max_retries
            if max_retries is None
            else max_retries,
            poison_pill_detection=poison_pill_detection,
            dlq_routing=dlq_routing,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            max_deferrals=max_deferrals,
            detector=detector or PoisonPillDetector(),
            on_dead_letter=on_dead_letter,
            tenant_of=_tenant_finder(function, bind),
            inbox=inbox,
            on_duplicate=on_duplicate,
            lookup_first=lookup_first,
        )
        is_async = inspect.iscoroutinefunction(function)

        @functools.wraps(function)
        def run(self: Task, *args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            outcome, reason = TaskOutcome.FAILED, ""
            try:
                with _log_context(self, policy, args, kwargs):
                    result = _deliver(self, function, is_async, bind, policy, args, kwargs)
                duplicate = getattr(self.request, "aura_duplicate", False)
                outcome = TaskOutcome.DUPLICATE if duplicate else TaskOutcome.SUCCESS
                return result
            except DeadLettered as exc:
                outcome, reason = TaskOutcome.DEAD_LETTERED, exc.reason
                raise
            except Retry:
                deferred = getattr(self.request, "aura_deferred", False)
                outcome = TaskOutcome.DEFERRED if deferred else TaskOutcome.RETRY
                raise
            except Reject as exc:
                outcome = TaskOutcome.REQUEUED if exc.requeue else TaskOutcome.FAILED
                raise
            except HardTimeLimitExceeded:  # AsyncPool: as after prefork's kill at the hard
                events.emit(TaskTimedOut(self.name, TimeoutKind.HARD))  # limit, the message
                outcome = TaskOutcome.REQUEUED  # comes back
                raise Reject("past the hard time limit", requeue=True) from None
            finally:
                duration = time.monotonic() - started
                events.emit(TaskFinished(self.name, outcome, duration, reason))

        options = {
            "name": f"{function.__module__}.{function.__qualname__}",
            "base": _ResilientTask,
        } | celery_options
        # aura_signature becomes a class attribute: the envelope guard binds arguments to it.
        signature = _call_signature(function, bind)
        task: Task = celery.task(bind=True, max_retries=None, aura_signature=signature, **options)(
            run
        )
        return task

    return decorate(fn) if fn is not None else decorate


class _ResilientTask(Task):  # type: ignore[misc]
    """Its request stack lives in a context variable: ``self.request`` inside an ``async
    def`` task running on the shared loop (AsyncPool) is its own (see ContextStack). A
    delivery that ends in the DLQ raises ``DeadLettered``: an expected failure (logged
    without a traceback), whose message ``ResilientRequest`` acks."""

    Request = "aura.messaging.request:ResilientRequest"
    throws = (DeadLettered,)

    @classmethod
    def bind(cls, app: Celery) -> Any:
        bound = super().bind(app)
        if not isinstance(cls.__dict__.get("request_stack"), ContextStack):
            cls.request_stack = ContextStack()
        return bound


def _default_app() -> Celery:
    from aura.messaging.app import default_app

    return default_app()


def _log_context(
    task: Task, policy: _Policy, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> contextlib.AbstractContextManager[Any]:
    """Every log line of this delivery carries its task, message id, tenant (when the
    task has a ``tenant_id``), retry count and whether it is a redelivery (structlog
    context variables: the async pool copies them into the task's coroutine)."""
    request = task.request
    fields: dict[str, Any] = {
        "task": task.name,
        "message_id": request.id,
        "retries": request.retries or 0,
    }
    if (request.delivery_info or {}).get("redelivered"):
        fields["redelivered"] = True
    try:
        tenant = policy.tenant_of(args, kwargs)
    except Exception:  # a poison pill's arguments: no tenant to show
        tenant = None
    if tenant is not None:
        fields["tenant"] = tenant
    return structlog.contextvars.bound_contextvars(**fields)


def _call_signature(function: Callable[..., Any], bind: bool) -> inspect.Signature:
    """The parameters a message's arguments must bind to (``self`` left out)."""
    signature = inspect.signature(function)
    if bind:
        parameters = list(signature.parameters.values())[1:]
        signature = signature.replace(parameters=parameters)
    return signature


def _deliver(
    task: Task,
    function: Callable[..., Any],
    is_async: bool,
    bind: bool,
    policy: _Policy,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    runtime = _runtime(task.app)
    if policy.inbox is None:  # no database of Aura's in its path: no gate to wait at
        return _deliver_once(task, function, is_async, bind, policy, args, kwargs, runtime)
    gate = runtime.database_gate
    deadline = time.monotonic() + _outage_hold(task)
    while True:
        trial_since: float | None = None  # when this delivery's trial went, if it is one
        if not gate.is_open:
            waited_from = time.monotonic()
            entered = runtime.run(gate.admit(max(deadline - waited_from, 0.0)), hard_limited=False)
            if entered is None:  # held past the bound: through the broker, a deferral
                out = ServiceUnavailableError("the database stayed unavailable while held")
                _put_off_for_database(task, runtime, policy, out, args, kwargs)
                return None
            if entered is False:
                trial_since = gate.trial_out_since
            runtime.rearm_limits(time.monotonic() - waited_from)
        try:
            return _deliver_once(task, function, is_async, bind, policy, args, kwargs, runtime)
        except _DatabaseOut as out:  # no retry spent: held again, then tried again
            gate.failed(describe_exception(out.error, 300))
        finally:  # settled without a word about the database: the next may try
            gate.released(trial_since)


class _DatabaseOut(Exception):  # a signal inside _deliver, never raised out of it
    """The database could not be reached for this delivery (before or during its work)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


_OUTAGE_HOLD = 30.0  # seconds a delivery may wait at the outage gate before a deferral


def _outage_hold(task: Task) -> float:
    """How long this delivery may wait at the gate: ``aura_outage_hold`` (30 s); inline
    (prefork), within a third of the soft limit, whose timer runs meanwhile."""
    hold = float(task.app.conf.get("aura_outage_hold") or _OUTAGE_HOLD)
    if _runtime(task.app).threaded:
        return hold
    soft = task.soft_time_limit or task.app.conf.task_soft_time_limit
    return min(hold, float(soft) / 3) if soft else hold


_DATABASE_MODULES = ("sqlalchemy", "asyncpg", "aura.db")


def _database_out(exc: BaseException) -> bool:
    """The database cannot take this delivery now (refused, too many clients, a pool
    timeout): an outage to wait out. Only an error that came from the database: a task's
    own ConnectionError, or an LLM timeout raised from asyncio's, is an outage of
    something else (a retry). Not a transaction cut in flight either (its outcome is for
    the inbox and a retry to settle: ``DatabaseTransactionError``)."""
    chain = cause_chain(exc)
    if any(
        isinstance(link, DatabaseTransactionError | LLMError | CircuitOpenError) for link in chain
    ):
        return False
    return is_outage(exc) and any(_from_the_database(link) for link in chain)


def _from_the_database(error: BaseException) -> bool:
    """Raised by the database's driver or SQLAlchemy, or passed through their code."""
    if type(error).__module__.startswith(_DATABASE_MODULES):
        return True
    frames = error.__traceback__
    while frames is not None:
        if str(frames.tb_frame.f_globals.get("__name__", "")).startswith(_DATABASE_MODULES):
            return True
        frames = frames.tb_next
    return False


def _deliver_once(
    task: Task,
    function: Callable[..., Any],
    is_async: bool,
    bind: bool,
    policy: _Policy,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    runtime: _ProcessRuntime,
) -> Any:
    request = task.request
    redelivered = bool((request.delivery_info or {}).get("redelivered"))
    gate = runtime.database_gate
    if policy.inbox is not None:
        request.aura_fingerprint = message_fingerprint(task.name, args, kwargs)
        if policy.lookup_first and _settled_by_inbox(task, runtime, policy, args, kwargs):
            return None
    if redelivered:  # its last run never finished: say so, whatever comes of it
        events.emit(TaskRedelivered(task.name))
        _log.warning(
            "redelivered: its last delivery never finished (its worker was killed, or lost "
            "the broker connection before the ack)",
            task=task.name,
            message_id=request.id,
        )
        if _crash_budget_spent(task, runtime, policy, args, kwargs):
            return None
    call_args = (task, *args) if bind else args
    try:
        if is_async:
            result = runtime.run(function(*call_args, **kwargs), soft_limited=True)
        else:
            result = function(*call_args, **kwargs)
    except (Retry, Ignore, Reject):
        raise  # the task steered Celery itself
    except CircuitOpenError as exc:
        return _defer(task, runtime, policy, exc, args, kwargs)
    except Exception as exc:
        if policy.inbox is not None and _database_out(exc):
            raise _DatabaseOut(exc) from exc
        if isinstance(exc, SoftTimeLimitExceeded):
            events.emit(TaskTimedOut(task.name, TimeoutKind.SOFT))
        return _fail(task, runtime, policy, exc, args, kwargs)
    if policy.inbox is not None and not gate.is_open:
        gate.succeeded()  # its statements went through: the database answers
    if request.retries or redelivered:  # a failure or deferral was counted: clear it
        _forget_counts(runtime, request.id)
    return result


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _fingerprint(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    known = getattr(task.request, "aura_fingerprint", None)
    return known if isinstance(known, str) else message_fingerprint(task.name, args, kwargs)


def _lookup(runtime: _ProcessRuntime, policy: _Policy, message_id: str) -> InboxEntry | None:
    assert policy.inbox is not None
    return runtime.run(policy.inbox.lookup(message_id))


def _settled_by_inbox(
    task: Task,
    runtime: _ProcessRuntime,
    policy: _Policy,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> bool:
    """True when the inbox settles this delivery before it runs: a committed twin (acked
    without running) or a committed other payload (dead-lettered as a conflict). If the
    inbox cannot be read, the delivery runs: its claim decides."""
    request = task.request
    try:
        entry = _lookup(runtime, policy, request.id)
    except Exception as exc:
        if is_outage(exc):  # an outage, not this message: no LLM call, no budget
            raise _DatabaseOut(exc) from exc  # held at the gate (``_deliver``)
        _log.warning(
            "inbox lookup failed; the delivery runs and its claim decides",
            task=task.name,
            message_id=request.id,
            error=describe_exception(exc, 300),
        )
        return False
    if not runtime.database_gate.is_open:
        runtime.database_gate.succeeded()  # it answered
    if entry is None:
        return False
    fingerprint = _fingerprint(task, args, kwargs)
    if not entry.matches(fingerprint):
        conflict = ConflictingMessageIdError(
            f"message id {request.id} was committed for another payload "
            f"(stored {entry.fingerprint}, this one {fingerprint})"
        )
        _dead_letter(
            task,
            runtime,
            policy,
            DeadLetterReason.CONFLICTING_MESSAGE_ID,
            conflict,
            args,
            kwargs,
            0,
            check_inbox=False,
        )
        return True
    _acknowledge_duplicate(task, runtime, policy, args, kwargs)
    return True


def _acknowledge_duplicate(
    task: Task,
    runtime: _ProcessRuntime,
    policy: _Policy,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """The effect is committed: redo recovery steps only, clear counters, ack."""
    request = task.request
    if policy.on_duplicate is not None:
        try:
            runtime.run(policy.on_duplicate(*args, **kwargs))
        except (Retry, Ignore, Reject):
            raise
        except Exception as exc:  # a failed recovery step is retried like any failure;
            _fail(task, runtime, policy, exc, args, kwargs)  # never dead-lettered: committed
            return
    _forget_counts(runtime, request.id)
    request.aura_duplicate = True
    events.emit(DuplicateDelivered(DuplicateKind.COMMITTED))
    _log.info(
        "effect already committed; delivery acked without running",
        task=task.name,
        message_id=request.id,
    )


def report_duplicate(task: Task) -> None:
    """For a ``lookup_first=False`` task: its own claim found this delivery's effect
    committed (nothing was written). Counted (``duplicate_deliveries``) and logged as the
    inbox read's twins are."""
    task.request.aura_duplicate = True
    events.emit(DuplicateDelivered(DuplicateKind.COMMITTED))
    _log.info(
        "effect already committed; the delivery's claim found it",
        task=task.name,
        message_id=task.request.id,
    )


def _forget_counts(runtime: _ProcessRuntime, message_id: str) -> None:
    """Clear the retry and deferral counters; best effort (their TTL ends them anyway).
    A Redis outage here must not fail a delivery whose effect is committed."""
    try:
        keys = (KEY_PREFIX + message_id, DEFER_PREFIX + message_id)
        runtime.run(_await(runtime.redis.delete(*keys)))
    except Exception as exc:  # unreachable, a full pool, ...: never a reason to fail
        _log.warning(
            "could not clear the retry counters; their TTL ends them",
            message_id=message_id,
            error=describe_exception(exc, 300),
        )


def _crash_budget_spent(
    task: Task,
    runtime: _ProcessRuntime,
    policy: _Policy,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> bool:
    """A redelivered message: its last run never finished (the worker died, or the
    connection was lost). Count that as a failure in the same budget as retries, so
    crashes and retries together stay within max_retries + 1 executions."""
    request = task.request
    tracker = runtime.tracker(KEY_PREFIX, policy.max_retries)
    try:
        spent = runtime.run(
            tracker.increment_and_check(request.id, fallback_count=failures_so_far(request))
        )
    except Exception as exc:  # Redis refusing (a full pool, say): run it; the broker's
        _log.warning(  # delivery limit still bounds a message that kills every run
            "could not count a redelivery; running it",
            task=task.name,
            message_id=request.id,
            error=describe_exception(exc, 300),
        )
        return False
    if not spent:
        return False
    lost = WorkerLostError("its worker died on every run (killed, out of memory or hard limit)")
    _dead_letter(
        task, runtime, policy, DeadLetterReason.WORKER_LOST, lost, args, kwargs, policy.max_retries
    )
    return True


def _dead_letter(
    task: Task,
    runtime: _ProcessRuntime,
    policy: _Policy,
    reason: DeadLetterReason,
    exc: BaseException,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    retries: int,
    error_text: str | None = None,
    *,
    check_inbox: bool = True,
) -> None:
    """Dead-letter this delivery -- unless the inbox shows its effect committed (then it
    is a success), or this very letter was already written (then it is acked)."""
    request = task.request
    fingerprint = _fingerprint(task, args, kwargs)
    entry = None
    if check_inbox and policy.inbox is not None:
        entry = _committed_entry(task, runtime, policy, exc)
    if entry is not None and not entry.matches(fingerprint):
        # The id is committed for another payload: that, not how this one failed, is its
        # fate (a task that does not read the inbox first learns it only here).
        reason = DeadLetterReason.CONFLICTING_MESSAGE_ID
    elif entry is not None:
        request.aura_duplicate = True
        events.emit(DuplicateDelivered(DuplicateKind.COMMITTED))
        _log.warning(
            "effect already committed; acked, not dead-lettered",
            task=task.name,
            message_id=request.id,
            reason=reason.value,
        )
        _forget_counts(runtime, request.id)
        return
    try:
        with runtime.publishing() as connection:
            routed = route_to_dlq(
                request.id,
                reason,
                connection=connection,
                task=task.name,
                queue=queue_of(request.delivery_info),
                args=list(args),
                kwargs=kwargs,
                error=exc,
                error_text=error_text,
                retries=retries,
                tenant_id=policy.tenant_of(args, kwargs),
                fingerprint=fingerprint,
                replay_count=replay_count_of(request),
            )
            # Off the loop, bounded by its own clock, not the task's (a blocked broker).
            letter = runtime.run(publish_within(routed, PUBLISH_BOUND), hard_limited=False)
    except Exception as publish_error:  # not in the DLQ: never acked, never rejected away
        _log.warning(
            "could not publish the dead letter; the message goes back to its queue",
            task=task.name,
            message_id=request.id,
            reason=reason.value,
            error=describe_exception(publish_error, 300),
        )
        raise Reject("its dead letter could not be published", requeue=True) from publish_error
    if policy.on_dead_letter is not None:
        try:
            runtime.run(_hook_with_retries(policy.on_dead_letter, letter), hard_limited=False)
        except Exception as hook_error:  # the letter is safe; a failing hook must not undo it
            _log.error(
                "on_dead_letter hook failed",
                task=task.name,
                message_id=request.id,
                error=describe_exception(hook_error, 300),
            )
    _forget_counts(runtime, request.id)  # its fate is the DLQ: no count outlives it
    _log.error(
        "message sent to the dead-letter queue",
        task=task.name,
        message_id=request.id,
        reason=reason.value,
        error=letter.error,
        dead_letter=letter.id,
        replay_count=letter.replay_count,
    )
    raise DeadLettered(f"dead-lettered ({reason.value}): {letter.error}", reason.value, letter.id)


_HOOK_BOUND = 60.0  # seconds a hook after a fate is tried again while the database is out


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


def failures_so_far(request: Any) -> int:
    """The failures this message met before this delivery (its ``aura_failures`` header;
    a message retried by an older worker has none: Celery's retries stand in)."""
    value = getattr(request, FAILURES_HEADER, None)
    if value is None and isinstance(getattr(request, "headers", None), dict):
        value = request.headers.get(FAILURES_HEADER)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return int(getattr(request, "retries", 0) or 0)


def replay_count_of(request: Any) -> int:
    """How often this delivery's message was replayed from the DLQ (its header)."""
    value = getattr(request, REPLAY_HEADER, None)
    if value is None and isinstance(getattr(request, "headers", None), dict):
        value = request.headers.get(REPLAY_HEADER)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _committed_entry(
    task: Task, runtime: _ProcessRuntime, policy: _Policy, exc: BaseException
) -> InboxEntry | None:
    """What the inbox holds committed under this delivery's id. If the inbox cannot be
    read, the answer is unknown: the delivery is put off (deferral budget) rather than
    dead-lettered on a guess; once that budget is spent it is dead-lettered (and logged)."""
    request = task.request
    try:
        entry = _lookup(runtime, policy, request.id)
    except Exception as lookup_error:
        spent = _deferrals_spent(task, runtime, policy)
        text = describe_exception(lookup_error, 300)
        if spent:
            _log.error("inbox unreadable and deferrals spent; dead-lettering", error=text)
            return None
        _log.warning(
            "inbox unreadable: cannot tell whether the effect is committed; put off",
            task=task.name,
            message_id=request.id,
            error=text,
        )
        _retry(task, exc, _outage_countdown(task, runtime), deferral=True)
    return entry


def _deferrals_spent(task: Task, runtime: _ProcessRuntime, policy: _Policy) -> bool:
    """Count one more deferral of this delivery; whether that spends ``max_deferrals``
    (Redis unable to count: Celery's own count of the delivery's retries bounds it)."""
    request = task.request
    deferrals = runtime.tracker(DEFER_PREFIX, policy.max_deferrals)
    try:
        return bool(
            runtime.run(deferrals.increment_and_check(request.id, fallback_count=request.retries))
        )
    except Exception:
        return bool(request.retries >= policy.max_deferrals)


_OUTAGE_BACKOFF_CAP = 10.0  # seconds: a deferred delivery resumes within this of recovery


def _outage_countdown(task: Task, runtime: _ProcessRuntime) -> float:
    """Exponential backoff, half jittered, by the delivery's own retries (a wrong address
    made 34 deliveries in 56 s at a flat second each), capped so that work resumes within
    ``_OUTAGE_BACKOFF_CAP`` seconds of the dependency answering."""
    attempt = int(getattr(task.request, "retries", 0) or 0) + 1
    delay = backoff_delay(attempt, base=1.0, cap=_OUTAGE_BACKOFF_CAP, rng=runtime.rng)
    return max(delay, _MIN_COUNTDOWN)


def _put_off_for_database(
    task: Task,
    runtime: _ProcessRuntime,
    policy: _Policy,
    exc: BaseException,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """The database cannot be reached before the delivery runs: put it off (deferral
    budget, exponential backoff) without running it -- no LLM call, no retry spent -- or,
    the deferrals spent, dead-letter it (``max_deferrals_exceeded``)."""
    request = task.request
    spent = _deferrals_spent(task, runtime, policy)
    text = describe_exception(exc, 300)
    if spent:
        _log.error("the database stayed unavailable past the deferrals; dead-lettering", error=text)
        _dead_letter(
            task,
            runtime,
            policy,
            DeadLetterReason.MAX_DEFERRALS_EXCEEDED,
            exc,
            args,
            kwargs,
            request.retries,
            check_inbox=False,
        )
        return
    countdown = _outage_countdown(task, runtime)
    events.emit(TaskRetried(task.name, RetryKind.DEFERRAL))
    _log.warning(
        "the database is unavailable; put off before running",
        task=task.name,
        message_id=request.id,
        countdown=round(countdown, 3),
        error=text,
    )
    _retry(task, exc, countdown, deferral=True)


def _tenant_finder(
    function: Callable[..., Any], bind: bool
) -> Callable[[tuple[Any, ...], dict[str, Any]], str | None]:
    """How to find the ``tenant_id`` argument of a call (by keyword or by position), so
    each dead letter names its tenant and ``aura dlq ls --tenant`` finds it."""
    signature = inspect.signature(function)

    def tenant_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        try:
            bound = signature.bind_partial(*((None,) if bind else ()), *args, **kwargs)
        except TypeError:  # arguments that do not fit the task (a poison pill, say)
            tenant = kwargs.get("tenant_id")
        else:
            tenant = bound.arguments.get("tenant_id")
        return None if tenant is None else str(tenant)

    return tenant_of


def _fail(
    task: Task,
    runtime: _ProcessRuntime,
    policy: _Policy,
    exc: Exception,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    request = task.request
    if any(isinstance(link, ConflictingMessageIdError) for link in cause_chain(exc)):
        # Its claim found the id committed for another payload (a twin ran at once).
        _dead_letter(
            task,
            runtime,
            policy,
            DeadLetterReason.CONFLICTING_MESSAGE_ID,
            exc,
            args,
            kwargs,
            0,
            check_inbox=False,
        )
        return None
    if policy.poison_pill_detection and policy.detector.is_poison_pill(exc):
        if not policy.dlq_routing:
            raise exc
        reason = policy.detector.get_poison_reason(exc)
        _dead_letter(
            task, runtime, policy, DeadLetterReason.POISON_PILL, exc, args, kwargs, 0, reason
        )
        return None
    tracker = runtime.tracker(KEY_PREFIX, policy.max_retries)
    # The failures so far, this one included. Not request.retries: that also counts the
    # deferrals, and a task put off five times by an open breaker is on its first failure.
    failures = runtime.run(tracker.increment(request.id, fallback_count=failures_so_far(request)))
    if failures > policy.max_retries:
        if not policy.dlq_routing:
            raise exc
        _dead_letter(
            task,
            runtime,
            policy,
            DeadLetterReason.MAX_RETRIES_EXCEEDED,
            exc,
            args,
            kwargs,
            policy.max_retries,
        )
        return None
    countdown = backoff_delay(
        failures, base=policy.backoff_base, cap=policy.backoff_max, rng=runtime.rng
    )
    if isinstance(exc, LLMHTTPStatusError) and exc.retry_after:
        countdown = max(countdown, exc.retry_after)
    countdown = max(countdown, _MIN_COUNTDOWN)
    events.emit(TaskRetried(task.name, RetryKind.RETRY))
    _log.warning(
        "task failed; retrying",
        task=task.name,
        message_id=request.id,
        attempt=failures,
        countdown=round(countdown, 3),
        error=describe_exception(exc),
    )
    _retry(task, exc, countdown, failures=failures)


def _defer(
    task: Task,
    runtime: _ProcessRuntime,
    policy: _Policy,
    exc: CircuitOpenError,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    request = task.request
    if _deferrals_spent(task, runtime, policy):
        _dead_letter(
            task,
            runtime,
            policy,
            DeadLetterReason.MAX_DEFERRALS_EXCEEDED,
            exc,
            args,
            kwargs,
            request.retries,
        )
        return None
    # Spread the fleet's trials over a second past the moment the breaker may allow one.
    countdown = max(exc.retry_after + runtime.rng.uniform(0, 1.0), _MIN_COUNTDOWN)
    events.emit(TaskRetried(task.name, RetryKind.DEFERRAL))
    _retry(task, exc, countdown, deferral=True)


def _retry(
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
