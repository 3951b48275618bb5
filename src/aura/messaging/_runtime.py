"""One worker process's asyncio runtime: the loop ``async def`` tasks run on, its clients,
and -- under ``AsyncPool`` -- the per-task time limits Celery cannot give a thread.

Two ways to run, chosen by the pool:

    inline    (prefork, solo)  the calling thread drives the loop (``run_until_complete``),
                               one delivery at a time; Celery's own soft and hard limits
                               apply (the soft one cancels the coroutine, cleanup runs)
    threaded  (AsyncPool)      the loop runs for the process's life in a thread of its
                               own; each delivery's tracer runs in a greenlet on it
                               (``run_in_greenlet``) and hands its coroutines to the
                               loop, so N tasks are in flight at once

Time limits, threaded (Celery enforces none there), per task:

    soft   the task's coroutine is cancelled at its soft limit and awaited, so its cleanup
           and rollbacks run; ``SoftTimeLimitExceeded`` is raised in its greenlet, exactly
           as prefork's signal raises it (a transient failure: retried)
    hard   a task still running at its hard limit (it swallowed the cancellation) is
           given up: ``HardTimeLimitExceeded`` in its greenlet, the message is requeued (its
           next delivery counts as a crash, as after prefork's kill) and the process is
           recycled once the others drain, so the stray coroutine ends with it
    loop   a loop that does not answer for longer than the hard limit (a coroutine that
           blocks it) ends the process (exit 70): every message it held is redelivered

Blocking calls the fate engine makes (a retry's or a dead letter's confirmed publish) run
in a thread (``call_off_loop``), never on the loop's thread: a broker that blocks its
publishers (a memory or disk alarm) holds that delivery's greenlet, bounded by
``PUBLISH_BOUND`` and not by the task's hard limit (the task's own work is done), while
every other task and the watchdog go on. The outage gate's wait (``aura.messaging._gate``)
is outside the time limits too: they are re-armed when the delivery starts its work.

The clients are sized for the concurrency: the Redis pool waits (bounded) for a free
connection instead of failing, and a wait that runs out is a back-pressure error, never
taken for "Redis unreachable".
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import greenlet
import structlog
from billiard.exceptions import SoftTimeLimitExceeded
from celery import Celery
from redis.asyncio import Redis

from aura.config import get_settings
from aura.events import Dependency
from aura.messaging._bounded import PUBLISH_BOUND, publish_within
from aura.messaging._gate import OutageGate
from aura.messaging._retry import RetryTracker
from aura.redis_connect import async_redis

__all__ = [
    "ContextStack",
    "HardTimeLimitExceeded",
    "ProcessRuntime",
    "call_off_loop",
    "new_event_loop",
    "process_runtime",
    "run_in_greenlet",
    "start_threaded",
]

T = TypeVar("T")
_log = structlog.get_logger("aura.messaging.runtime")
_REDIS_POOL_WAIT = 10.0  # seconds a coroutine waits for a free Redis connection
_WATCHDOG_INTERVAL = 1.0
EXIT_LOOP_BLOCKED = 70


class HardTimeLimitExceeded(BaseException):
    """A task ran past its hard time limit (threaded runtime): given up and requeued. A
    BaseException, so no ``except Exception`` in a task or in the retry policy takes it
    for an ordinary failure."""


class ContextStack:
    """Celery's request stack, kept in a context variable instead of a thread-local.

    Celery pushes a task's request (``self.request``) on a stack local to the thread that
    runs it; a coroutine on the shared loop runs in another thread, where that stack is
    empty. In a context variable, the request travels with the context each coroutine is
    started in (``ProcessRuntime.run`` copies the calling thread's), so ``self.request``
    inside an ``async def`` task is its own, however many run at once."""

    def __init__(self) -> None:
        self._stack: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar(
            f"aura_request_stack_{id(self)}", default=()
        )

    def push(self, obj: Any) -> None:
        self._stack.set((*self._stack.get(), obj))

    def pop(self) -> Any:
        stack = self._stack.get()
        if not stack:
            return None
        self._stack.set(stack[:-1])
        return stack[-1]

    @property
    def top(self) -> Any:
        stack = self._stack.get()
        return stack[-1] if stack else None

    @property
    def stack(self) -> list[Any]:
        return list(self._stack.get())

    def __len__(self) -> int:
        return len(self._stack.get())


_LIMITS: contextvars.ContextVar[tuple[float | None, float | None]] = contextvars.ContextVar(
    "aura_task_limits", default=(None, None)
)


class _TaskGreenlet(greenlet.greenlet):  # type: ignore[misc]
    """Runs one delivery's Celery tracer (synchronous code) on the loop's thread; where
    that code waits for a coroutine (``ProcessRuntime.run``) it switches back to the
    loop, which awaits it and switches in again with the result (SQLAlchemy's asyncio
    bridge works the same way). No thread per task: no GIL hand-offs."""


async def run_in_greenlet(
    function: Callable[..., T], *args: Any, soft: float | None, hard: float | None
) -> T:
    """Run ``function(*args)`` in a task greenlet with these time limits (seconds)."""
    now = time.monotonic()
    limits = (None if soft is None else now + soft, None if hard is None else now + hard)

    def body() -> T:
        _LIMITS.set(limits)
        return function(*args)

    child = _TaskGreenlet(body, greenlet.getcurrent())
    child.gr_context = contextvars.copy_context()
    result = child.switch()
    while not child.dead:
        awaitable = result  # the child asks for this to be awaited
        try:
            value = await awaitable
        except BaseException:
            result = child.throw(*sys.exc_info())
        else:
            result = child.switch(value)
    return result  # type: ignore[no-any-return]


def new_event_loop(*, fast: bool = False) -> asyncio.AbstractEventLoop:
    """With ``fast``, uvloop's event loop where it is installed (the platform's extras
    install it), else asyncio's. Only for a loop on its own thread (the async pool): the
    time limits there are the runtime's own. Prefork's soft limit is a signal whose
    handler raises inside the running loop, and uvloop, waiting in C, does not let that
    exception through as asyncio's loop does (tests/worker/test_worker.py's soft-limit test).
    Measured with bench/async_worker.py: see bench/RESULTS.md."""
    if not fast:
        return asyncio.new_event_loop()
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class ProcessRuntime:
    """What one worker process keeps for its life: one event loop and its clients."""

    def __init__(self, app: Celery, *, concurrency: int = 1, threaded: bool = False) -> None:
        self.pid = os.getpid()
        self.app = app
        self.settings = get_settings()
        self.concurrency = concurrency
        self.loop = new_event_loop(fast=threaded)
        self.redis: Redis = _redis_client(self.settings.redis_url, concurrency)
        self.connection = app.connection_for_write()
        self.rng = random.Random()
        self._trackers: dict[tuple[str, int], RetryTracker] = {}
        # Inline under the solo pool on a transport without an event loop (the embedded
        # demo's in-memory broker), Celery runs countdown/ETA tasks on its timer thread
        # while the consumer thread runs the others: one loop, one delivery at a time.
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._publish_lock = threading.Lock()
        self.on_hard_limit: Callable[[], None] | None = None
        self.database_gate = OutageGate(Dependency.DATABASE, rng=self.rng)

    @property
    def threaded(self) -> bool:
        return self._thread is not None

    def tracker(self, prefix: str, limit: int) -> RetryTracker:
        key = (prefix, limit)
        if key not in self._trackers:
            ttl = self.settings.retry_tracker_ttl
            self._trackers[key] = RetryTracker(self.redis, limit, ttl, prefix=prefix)
        return self._trackers[key]

    # -- threaded mode -------------------------------------------------------------------
    def start_loop_thread(self) -> None:
        """Run the loop in a thread of its own from now on (``AsyncPool``)."""
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(ready.set)
            self.loop.run_forever()

        self._thread = threading.Thread(target=serve, name="aura-loop", daemon=True)
        self._thread.start()
        ready.wait(10)

    def stop_loop_thread(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)

    def watch_loop(self, hard_limit: float, exit_process: Callable[[int], None]) -> None:
        """End the process when the loop stops answering for longer than ``hard_limit``."""

        def watch() -> None:
            while self._thread is not None and self._thread.is_alive():
                answered = threading.Event()
                self.loop.call_soon_threadsafe(answered.set)
                if not answered.wait(hard_limit):
                    _log.critical(
                        "event loop blocked past the hard time limit; ending the process",
                        hard_limit=hard_limit,
                    )
                    exit_process(EXIT_LOOP_BLOCKED)
                    return
                time.sleep(_WATCHDOG_INTERVAL)

        threading.Thread(target=watch, name="aura-loop-watchdog", daemon=True).start()

    # -- both modes ----------------------------------------------------------------------
    def run(
        self,
        coroutine: Coroutine[Any, Any, T],
        *,
        soft_limited: bool = False,
        hard_limited: bool = True,
    ) -> T:
        """Run ``coroutine`` on this process's loop and return its result.

        ``soft_limited``: this is the task's own work, which its soft limit cancels
        (threaded mode; inline, Celery's signal does it). ``hard_limited=False``: a wait
        with a bound of its own (the outage gate, a publish), outside the task's limits."""
        if isinstance(greenlet.getcurrent(), _TaskGreenlet):
            if not hard_limited:
                return greenlet.getcurrent().parent.switch(  # type: ignore[no-any-return]
                    _in_context(self.loop, coroutine, contextvars.copy_context())
                )
            return self._run_from_greenlet(coroutine, soft_limited)
        if self._thread is None:
            return self._run_inline(coroutine)
        if threading.current_thread() is self._thread:  # would wait on itself forever
            coroutine.close()
            raise RuntimeError("ProcessRuntime.run called from a coroutine: await it instead")
        # Another thread of this process (not a task's): no task, so no time limits.
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def _run_from_greenlet(self, coroutine: Coroutine[Any, Any, T], soft_limited: bool) -> T:
        soft_at, hard_at = _LIMITS.get()
        wrapped = _soft_limited(coroutine, soft_at if soft_limited else None)
        # Awaited in a task of its own, in this greenlet's context (its task's request).
        return greenlet.getcurrent().parent.switch(  # type: ignore[no-any-return]
            self._hard_limited(wrapped, contextvars.copy_context(), hard_at)
        )

    async def _hard_limited(
        self, coroutine: Coroutine[Any, Any, T], context: contextvars.Context, hard_at: float | None
    ) -> T:
        task = self.loop.create_task(coroutine, context=context)
        timeout = None if hard_at is None else max(hard_at - time.monotonic(), 0)
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()  # it may ignore it: the process is recycled below
            if self.on_hard_limit is not None:
                self.on_hard_limit()
            raise HardTimeLimitExceeded("the task ran past its hard time limit")
        return task.result()

    def _run_inline(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """On the soft time limit (Celery's signal), cancel it and let it clean up."""
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

    def call_off_loop(self, function: Callable[[], T], *, bound: float = PUBLISH_BOUND) -> T:
        """``function()`` (blocking: a confirmed publish) in a thread, never on the loop's
        thread; ``PublishTimeout`` after ``bound`` seconds (the thread may still finish).
        Inline (prefork, solo: no loop shared with other tasks) it is called here. The
        thread runs in a copy of this greenlet's context (the task's request)."""
        if not isinstance(greenlet.getcurrent(), _TaskGreenlet):
            return function()

        return self.run(publish_within(asyncio.to_thread(function), bound), hard_limited=False)

    def rearm_limits(self, held_s: float) -> None:
        """The delivery waited ``held_s`` at the outage gate before its work: its time
        limits start now (threaded mode; inline, Celery's timer has run meanwhile)."""
        _LIMITS.set(tuple(None if at is None else at + held_s for at in _LIMITS.get()))  # type: ignore[arg-type]

    @contextlib.contextmanager
    def publishing(self) -> Iterator[Any]:
        """A broker connection to publish a dead letter on. Inline: this process's own,
        one user at a time (kombu connections are not thread-safe). Under AsyncPool: a
        connection of its own (it connects lazily, in the thread that publishes, and is
        closed after): a lock here would be held across the greenlet's switch to the
        loop, and a second greenlet waiting for it would block the loop's thread."""
        if not isinstance(greenlet.getcurrent(), _TaskGreenlet) and self._thread is None:
            with self._publish_lock:
                yield self.connection
            return
        connection = self.app.connection_for_write()
        try:
            yield connection
        finally:
            connection.release()


async def _in_context(
    loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, T], context: contextvars.Context
) -> T:
    return await loop.create_task(coroutine, context=context)


async def _soft_limited(coroutine: Coroutine[Any, Any, T], soft_at: float | None) -> T:
    if soft_at is None:
        return await coroutine
    loop_deadline = asyncio.get_running_loop().time() + (soft_at - time.monotonic())
    async with asyncio.timeout_at(loop_deadline) as limit:
        try:
            return await coroutine
        except asyncio.CancelledError:
            if limit.expired():
                raise SoftTimeLimitExceeded() from None
            raise
    raise AssertionError("unreachable")  # pragma: no cover


def _redis_client(url: str | None, concurrency: int) -> Redis:
    if url is None:  # embedded: an in-process stand-in
        from fakeredis import FakeAsyncRedis

        return FakeAsyncRedis()
    return async_redis(url, max_connections=max(50, concurrency), pool_timeout=_REDIS_POOL_WAIT)


_runtimes: dict[int, ProcessRuntime] = {}


def call_off_loop(function: Callable[[], T], *, bound: float = PUBLISH_BOUND) -> T:
    """``ProcessRuntime.call_off_loop`` of this process's runtime, from a task greenlet;
    anywhere else ``function()`` is called here (no loop of tasks to keep free)."""
    runtime = _runtimes.get(os.getpid())
    if runtime is None or not isinstance(greenlet.getcurrent(), _TaskGreenlet):
        return function()
    return runtime.call_off_loop(function, bound=bound)


def process_runtime(app: Celery) -> ProcessRuntime:
    """This process's runtime, made on first use (after fork in a prefork child)."""
    runtime = _runtimes.get(os.getpid())
    if runtime is None:
        runtime = _runtimes[os.getpid()] = ProcessRuntime(app)
    return runtime


def start_threaded(app: Celery, concurrency: int) -> ProcessRuntime:
    """Make this process's runtime threaded, for ``concurrency`` tasks at once."""
    runtime = _runtimes.get(os.getpid())
    if runtime is None or runtime.concurrency < concurrency:
        runtime = _runtimes[os.getpid()] = ProcessRuntime(
            app, concurrency=concurrency, threaded=True
        )
    if not runtime.threaded:
        runtime.start_loop_thread()
    return runtime
