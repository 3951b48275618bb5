"""``@resilient_task``: a Celery task whose every delivery ends in success, a retry or the DLQ.

Per delivery (the seed's "Error Handling Hierarchy"; each row is one rule of
``aura.messaging.rules``, asked in this order, the first answer deciding)::

    committed twin (inbox)  -> ack without running (``on_duplicate`` first)
    id reused (inbox)       -> DLQ (conflicting_message_id), before or after running
    worker killed           -> redelivered (acks_late, reject_on_worker_lost); a
                               redelivery counts as a failure in the retry budget, and
                               past it goes to the DLQ (worker_lost); the broker's
                               delivery limit dead-letters it too, should no run survive
    success                 -> ack (the retry counter is cleared if it was used)
    CircuitOpenError        -> deferred until the breaker may let a trial through; spends
                               no retry budget; after ``max_deferrals`` -> DLQ
                               (max_deferrals_exceeded)
    database out            -> held at the outage gate (no budget), then run again; past
                               ``aura_outage_hold`` deferred through the broker
    poison pill             -> DLQ (poison_pill) at once, no retry spent -> ack
    anything else           -> RetryTracker.increment -> retry with exponential backoff
                               and jitter (``aura.backoff``, Retry-After honoured), or,
                               past max_retries -> DLQ (max_retries_exceeded)

The order is data (``DEFAULT_RULES``); a task may take its own list (``rules=``), and a
rule that raises is logged and skipped. Carrying a fate out is ``aura.messaging._settle``:
a dead letter is published with a publisher confirm before the task returns, and Celery
acks the original (late) only after that: never lost, at worst duplicated in the DLQ. A
replayed message (header ``aura_replay_count``) carries its count into its next dead
letter and into its retries.

With an ``inbox`` (see ``aura.messaging._idempotency``) each delivery is looked up before
it runs, and no dead letter is written for a message whose effect the inbox shows
committed (one whose id it shows committed for another payload goes as
``conflicting_message_id``, however it failed). ``lookup_first=False``: the task's own
claim settles twins (see ``resilient_task``).

Redis is an optimisation of every step, never a condition of its fate: when it cannot
be reached, counting falls back to the message's own ``aura_failures`` header, clearing
counters after a success is skipped (their TTL ends them). A redelivery after a lost
connection is a redelivery: tasks are not cancelled on connection loss (they finish; the
inbox absorbs the twin).

``async def`` tasks run on one event loop per worker process, made after fork and kept
for the process's life (pooled database and Redis connections are bound to it). When
Celery's soft time limit fires, the coroutine is cancelled and awaited, so its cleanup
and rollbacks run before the timeout is handled as a transient failure.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import random
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar, cast, overload

import structlog
from celery import Celery, Task
from celery.exceptions import Ignore, Reject, Retry

from aura import events, tracing
from aura.backoff import Backoff
from aura.config import get_settings
from aura.errors import DeadLettered, ServiceUnavailableError
from aura.events import (
    TaskFinished,
    TaskOutcome,
    TaskTimedOut,
    TimeoutKind,
)
from aura.logs import describe_exception
from aura.messaging._idempotency import Inbox
from aura.messaging._poison import PoisonPillDetector
from aura.messaging._runtime import (
    ContextStack,
    HardTimeLimitExceeded,
    ProcessRuntime,
    process_runtime,
)
from aura.messaging._settle import (
    DatabaseOut,
    carry_out,
    count_duplicate,
    forget_counts,
    settle_failure,
)
from aura.messaging.delivery import (
    Delivery,
    TaskPolicy,
    call_signature,
    log_context,
    tenant_finder,
)
from aura.messaging.dlq import DeadLetter
from aura.messaging.fate import Rule, first_fate
from aura.messaging.rules import DEFAULT_RULES, DEFER_PREFIX, MIN_COUNTDOWN, put_off_for_database

__all__ = [
    "DEFAULT_RULES",
    "DEFER_PREFIX",
    "backoff_delay",
    "process_loop",
    "report_duplicate",
    "resilient_task",
]

T = TypeVar("T")
_log = structlog.get_logger("aura.messaging.task")


def backoff_delay(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Seconds before retry ``attempt`` (1, 2, ...): exponential, capped, half jittered
    (``aura.backoff.Backoff``)."""
    return Backoff(base=base, cap=cap).delay(attempt, rng)


def process_loop(app: Celery | None = None) -> asyncio.AbstractEventLoop:
    """This worker process's event loop (the one ``async def`` tasks run on)."""
    return process_runtime(app if app is not None else _default_app()).loop


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
    backoff_base: float | None = None,
    backoff_max: float | None = None,
    max_deferrals: int = 30,
    detector: PoisonPillDetector | None = None,
    on_dead_letter: Callable[[DeadLetter], Coroutine[Any, Any, None]] | None = None,
    inbox: Inbox | None = None,
    on_duplicate: Callable[..., Coroutine[Any, Any, None]] | None = None,
    lookup_first: bool = True,
    rules: Sequence[Rule] | None = None,
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
    backoff_base: float | None = None,
    backoff_max: float | None = None,
    max_deferrals: int = 30,
    detector: PoisonPillDetector | None = None,
    on_dead_letter: Callable[[DeadLetter], Coroutine[Any, Any, None]] | None = None,
    inbox: Inbox | None = None,
    on_duplicate: Callable[..., Coroutine[Any, Any, None]] | None = None,
    lookup_first: bool = True,
    rules: Sequence[Rule] | None = None,
    **celery_options: Any,
) -> Any:
    """Decorate a ``def`` or ``async def`` as a resilient Celery task (see the module doc).

    ``max_retries`` defaults to RETRY_TRACKER_MAX_RETRIES. ``max_deferrals`` bounds how
    often a task is put off while the LLM circuit is open (30 x the breaker's reset timeout,
    30 minutes with the seed's 60 s). ``on_dead_letter`` is awaited with each dead letter
    once it is safe in the DLQ (to mark the record failed, say); if it fails, that is
    logged and nothing else changes. ``inbox`` makes deliveries idempotent by id and
    payload (``aura.messaging._idempotency``); ``on_duplicate`` is awaited, with the
    task's arguments, when a delivery's effect is already committed (to redo a recovery
    step such as queueing follow-up work). ``lookup_first=False`` skips the inbox read
    before each delivery, for a task whose effect is one statement that claims the id and
    tells a committed twin itself (``aura.catalog.pipeline``): that read would be a second round
    trip for the same answer. Such a task raises ``ConflictingMessageIdError`` for another
    payload, and reports a twin with ``report_duplicate`` (``on_duplicate`` is not called:
    the task does its recovery steps itself); the inbox is still read before every dead
    letter. ``backoff_base`` / ``backoff_max`` default to RETRY_BACKOFF_BASE / _MAX.
    ``rules`` is the task's fate rules in order (``DEFAULT_RULES``; see
    ``aura.messaging.rules``). Other keyword arguments go to ``app.task`` (``name``, ``queue``,
    ``soft_time_limit``, ...).
    """

    def decorate(function: Callable[..., Any]) -> Task:
        celery = app if app is not None else _default_app()
        policy = TaskPolicy(
            max_retries=_or_setting(max_retries, "retry_tracker_max_retries"),
            poison_pill_detection=poison_pill_detection,
            dlq_routing=dlq_routing,
            backoff=Backoff(
                base=_or_setting(backoff_base, "retry_backoff_base"),
                cap=_or_setting(backoff_max, "retry_backoff_max"),
                floor=MIN_COUNTDOWN,
            ),
            max_deferrals=max_deferrals,
            detector=detector or PoisonPillDetector(),
            on_dead_letter=on_dead_letter,
            tenant_of=tenant_finder(function, bind),
            inbox=inbox,
            on_duplicate=on_duplicate,
            rules=tuple(DEFAULT_RULES if rules is None else rules),
            lookup_first=lookup_first,
        )
        options = {
            "name": f"{function.__module__}.{function.__qualname__}",
            "base": _ResilientTask,
        } | celery_options
        # aura_signature becomes a class attribute: the envelope guard binds arguments to it.
        signature = call_signature(function, bind)
        task: Task = celery.task(bind=True, max_retries=None, aura_signature=signature, **options)(
            _task_body(function, bind, policy)
        )
        return task

    return decorate(fn) if fn is not None else decorate


def _or_setting(given: T | None, setting: str) -> T:
    """An explicit value (0 included), else the setting (read only when needed)."""
    return given if given is not None else cast(T, getattr(get_settings(), setting))


def _task_body(function: Callable[..., Any], bind: bool, policy: TaskPolicy) -> Callable[..., Any]:
    """What Celery runs: one delivery, its outcome counted however it ends."""
    is_async = inspect.iscoroutinefunction(function)

    @functools.wraps(function)
    def run(self: Task, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        outcome, reason = TaskOutcome.FAILED, ""
        try:
            with log_context(self, policy, args, kwargs):
                result = _deliver(self, function, is_async, bind, policy, args, kwargs)
            duplicate = getattr(self.request, "aura_duplicate", False)
            outcome = TaskOutcome.DUPLICATE if duplicate else TaskOutcome.SUCCESS
            return result
        except DeadLettered as exc:
            outcome, reason = TaskOutcome.DEAD_LETTERED, exc.reason
            raise exc.with_traceback(None) from exc.__cause__  # as a retry, below
        except Retry as retry:
            deferred = getattr(self.request, "aura_deferred", False)
            outcome = TaskOutcome.DEFERRED if deferred else TaskOutcome.RETRY
            # Without the frames below this one: Celery's tracer copies every frame of a
            # retry's traceback into a picklable ExceptionInfo (billiard's, each code
            # object's every position listed) that no one reads here (no result backend;
            # the retry is logged by its reason). It was 21 % of the embedded demo's
            # GIL-held time, 695 retries and deferrals in a run.
            raise retry.with_traceback(None) from retry.__cause__
        except Reject as exc:
            outcome = TaskOutcome.REQUEUED if exc.requeue else TaskOutcome.FAILED
            raise
        except HardTimeLimitExceeded:  # AsyncPool: as after prefork's kill at the hard
            events.emit(TaskTimedOut(self.name, TimeoutKind.HARD))  # limit, the message
            outcome = TaskOutcome.REQUEUED  # comes back
            raise Reject("past the hard time limit", requeue=True) from None
        finally:
            duration = time.monotonic() - started
            tenant = _tenant_of(policy, args, kwargs)  # a label only as tenant_labels allows
            events.emit(TaskFinished(self.name, outcome, duration, reason, tenant))
            if tracing.enabled():  # on the run span Celery's instrumentation made current
                tracing.delivery_attributes(
                    outcome, reason, self.request, tenant, sys.exc_info()[1]
                )

    return run


def _tenant_of(policy: TaskPolicy, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    try:
        return policy.tenant_of(args, kwargs)
    except Exception:  # a poison pill's arguments: no tenant to count
        return None


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


def _deliver(
    task: Task,
    function: Callable[..., Any],
    is_async: bool,
    bind: bool,
    policy: TaskPolicy,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """One delivery; with an inbox, held at the outage gate while the database is out
    (slot held, message unacked, no retry spent), then run again."""
    runtime = process_runtime(task.app)
    if policy.inbox is None:  # no database of Aura's in its path: no gate to wait at
        return _run_once(Delivery(task, policy, runtime, args, kwargs), function, is_async, bind)
    gate = runtime.database_gate
    limits_from = time.monotonic()  # its limits were armed as the delivery began
    deadline = limits_from + _outage_hold(task, runtime)
    held = False  # held at the gate, or a try the outage failed: the limits start again
    while True:
        delivery = Delivery(task, policy, runtime, args, kwargs)
        trial_since: float | None = None  # when this delivery's trial went, if it is one
        if not gate.is_open:
            held = True
            entered = runtime.run(
                gate.admit(max(deadline - time.monotonic(), 0.0)), hard_limited=False
            )
            if entered is None:  # held past the bound: through the broker, a deferral
                out = ServiceUnavailableError("the database stayed unavailable while held")
                carry_out(delivery, put_off_for_database(delivery, out))
                return None
            if entered is False:
                trial_since = gate.trial_out_since
        if held:  # let through: its limits start now. The hold is given back, and so is
            # a try the outage failed (up to a 3 s wait for a connection: it once ate most
            # of a short soft limit, and the delivery let through met it at once)
            now = time.monotonic()
            runtime.rearm_limits(now - limits_from)
            limits_from, held = now, False
        try:
            return _run_once(delivery, function, is_async, bind)
        except DatabaseOut as out:  # no retry spent: held again, then tried again
            gate.failed(describe_exception(out.error, 300))
            held = True
        finally:  # settled without a word about the database: the next may try
            gate.released(trial_since)


_OUTAGE_HOLD = 30.0  # seconds a delivery may wait at the gate before a deferral


def _outage_hold(task: Task, runtime: ProcessRuntime) -> float:
    """How long this delivery may wait at the gate: ``aura_outage_hold`` (30 s); inline
    (prefork), within a third of the soft limit, whose timer runs meanwhile."""
    hold = float(task.app.conf.get("aura_outage_hold") or _OUTAGE_HOLD)
    if runtime.threaded:
        return hold
    soft = task.soft_time_limit or task.app.conf.task_soft_time_limit
    return min(hold, float(soft) / 3) if soft else hold


def _run_once(delivery: Delivery, function: Callable[..., Any], is_async: bool, bind: bool) -> Any:
    """The rules before it runs, the task, then the rules on its failure."""
    if delivery.policy.inbox is not None:  # the task's claim reads it (delivery_fingerprint)
        delivery.request.aura_fingerprint = delivery.fingerprint
    settled = first_fate(delivery.policy.rules, lambda rule: rule.before(delivery), delivery)
    if settled is not None:
        carry_out(delivery, settled)
        return None
    call_args = (delivery.task, *delivery.args) if bind else delivery.args
    try:
        if is_async:
            coroutine = function(*call_args, **delivery.kwargs)
            result = delivery.run(coroutine, soft_limited=True)
        else:
            result = function(*call_args, **delivery.kwargs)
    except (Retry, Ignore, Reject):
        raise  # the task steered Celery itself
    except Exception as exc:
        settle_failure(delivery, exc)
        return None
    gate = delivery.runtime.database_gate
    if delivery.policy.inbox is not None and not gate.is_open:
        gate.succeeded()  # its statements went through: the database answers
    if delivery.retries or delivery.redelivered:  # a failure or deferral was counted
        forget_counts(delivery)
    return result


def report_duplicate(task: Task) -> None:
    """For a ``lookup_first=False`` task: its own claim found this delivery's effect
    committed (nothing was written). Counted (``duplicate_deliveries``) and logged as the
    inbox read's twins are."""
    count_duplicate(task.request)
    _log.info(
        "effect already committed; the delivery's claim found it",
        task=task.name,
        message_id=task.request.id,
    )
