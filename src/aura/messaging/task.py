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
import os
import random
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import structlog
from billiard.exceptions import SoftTimeLimitExceeded, WorkerLostError
from celery import Celery, Task
from celery.exceptions import Ignore, Reject, Retry
from redis.asyncio import Redis

from aura import events
from aura.config import get_settings
from aura.errors import CircuitOpenError, LLMHTTPStatusError
from aura.events import DeadLetterReason, RetryKind, TaskRetried, TaskTimedOut, TimeoutKind
from aura.messaging.dlq import DeadLetter, queue_of, route_to_dlq
from aura.messaging.poison import PoisonPillDetector
from aura.messaging.retry import KEY_PREFIX, RetryTracker

__all__ = ["DEFER_PREFIX", "backoff_delay", "process_loop", "resilient_task"]

T = TypeVar("T")
_log = structlog.get_logger("aura.messaging.task")
DEFER_PREFIX = "defer_count:"
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


class _ProcessRuntime:
    """What one worker process keeps for its life: one event loop and its clients."""

    def __init__(self, app: Celery) -> None:
        self.pid = os.getpid()
        self.settings = get_settings()
        self.loop = asyncio.new_event_loop()
        self.redis: Redis = _redis_client(self.settings.redis_url)
        self.connection = app.connection_for_write()
        self.rng = random.Random()
        self._trackers: dict[tuple[str, int], RetryTracker] = {}
        # Under the solo pool on a transport without an event loop (the embedded demo's
        # in-memory broker), Celery runs countdown/ETA tasks on its timer thread while
        # the consumer thread runs the others: one loop, so one delivery at a time.
        self._lock = threading.RLock()

    def tracker(self, prefix: str, limit: int) -> RetryTracker:
        key = (prefix, limit)
        if key not in self._trackers:
            ttl = self.settings.retry_tracker_ttl
            self._trackers[key] = RetryTracker(self.redis, limit, ttl, prefix=prefix)
        return self._trackers[key]

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on this process's loop; on the soft time limit, cancel it and
        let it clean up before the limit is raised."""
        with self._lock:
            task = self.loop.create_task(coroutine)
            try:
                return self.loop.run_until_complete(task)
            except SoftTimeLimitExceeded:
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        self.loop.run_until_complete(task)
                raise


def _redis_client(url: str | None) -> Redis:
    if url is None:  # embedded: an in-process stand-in
        from fakeredis import FakeAsyncRedis

        return FakeAsyncRedis()
    return Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)


_runtimes: dict[int, _ProcessRuntime] = {}


def _runtime(app: Celery) -> _ProcessRuntime:
    runtime = _runtimes.get(os.getpid())
    if runtime is None:  # first use in this process (after fork in a prefork child)
        runtime = _runtimes[os.getpid()] = _ProcessRuntime(app)
    return runtime


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
    **celery_options: Any,
) -> Any:
    """Decorate a ``def`` or ``async def`` as a resilient Celery task (see the module doc).

    ``max_retries`` defaults to RETRY_TRACKER_MAX_RETRIES. ``max_deferrals`` bounds how
    often a task is put off while the LLM circuit is open (30 x the breaker's reset timeout,
    30 minutes with the seed's 60 s). ``on_dead_letter`` is awaited with each dead letter
    once it is safe in the DLQ (to mark the record failed, say); if it fails, that is
    logged and nothing else changes. Other keyword arguments go to ``app.task`` (``name``,
    ``queue``, ``soft_time_limit``, ...).
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
        )
        is_async = inspect.iscoroutinefunction(function)

        @functools.wraps(function)
        def run(self: Task, *args: Any, **kwargs: Any) -> Any:
            return _deliver(self, function, is_async, bind, policy, args, kwargs)

        options = {"name": f"{function.__module__}.{function.__qualname__}"} | celery_options
        task: Task = celery.task(bind=True, max_retries=None, **options)(run)
        return task

    return decorate(fn) if fn is not None else decorate


def _default_app() -> Celery:
    from aura.worker.celery_app import celery_app

    return celery_app


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
    redelivered = bool((task.request.delivery_info or {}).get("redelivered"))
    if redelivered and _crash_budget_spent(task, runtime, policy, args, kwargs):
        return None
    call_args = (task, *args) if bind else args
    try:
        if is_async:
            result = runtime.run(function(*call_args, **kwargs))
        else:
            result = function(*call_args, **kwargs)
    except (Retry, Ignore, Reject):
        raise  # the task steered Celery itself
    except CircuitOpenError as exc:
        return _defer(task, runtime, policy, exc, args, kwargs)
    except Exception as exc:
        if isinstance(exc, SoftTimeLimitExceeded):
            events.emit(TaskTimedOut(task.name, TimeoutKind.SOFT))
        return _fail(task, runtime, policy, exc, args, kwargs)
    if task.request.retries or redelivered:  # a failure was counted: clear it
        runtime.run(runtime.tracker(KEY_PREFIX, policy.max_retries).reset(task.request.id))
    return result


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
    if not runtime.run(tracker.increment_and_check(request.id, fallback_count=request.retries)):
        return False
    lost = WorkerLostError("its worker died on every run (killed, out of memory or hard limit)")
    _dead_letter(
        task, runtime, policy, DeadLetterReason.WORKER_LOST, lost, args, kwargs, policy.max_retries
    )
    runtime.run(tracker.reset(request.id))
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
) -> None:
    request = task.request
    letter = runtime.run(
        route_to_dlq(
            request.id,
            reason,
            connection=runtime.connection,
            task=task.name,
            queue=queue_of(request.delivery_info),
            args=list(args),
            kwargs=kwargs,
            error=exc,
            error_text=error_text,
            retries=retries,
            tenant_id=policy.tenant_of(args, kwargs),
        )
    )
    if policy.on_dead_letter is not None:
        try:
            runtime.run(policy.on_dead_letter(letter))
        except Exception:  # the dead letter is safe; a failing hook must not undo that
            _log.exception("on_dead_letter hook failed", task=task.name, message_id=request.id)
    _log.error(
        "message sent to the dead-letter queue",
        task=task.name,
        message_id=request.id,
        reason=reason.value,
        error=letter.error,
        dead_letter=letter.id,
    )


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
    failures = runtime.run(tracker.increment(request.id, fallback_count=request.retries))
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
        runtime.run(tracker.reset(request.id))
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
        error=f"{type(exc).__name__}: {exc}",
    )
    raise task.retry(exc=exc, countdown=countdown)


def _defer(
    task: Task,
    runtime: _ProcessRuntime,
    policy: _Policy,
    exc: CircuitOpenError,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    request = task.request
    deferrals = runtime.tracker(DEFER_PREFIX, policy.max_deferrals)
    exhausted = runtime.run(
        deferrals.increment_and_check(request.id, fallback_count=request.retries)
    )
    if exhausted:
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
    raise task.retry(exc=exc, countdown=countdown)
