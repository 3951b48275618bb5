"""``AsyncPool``: one worker process, many ``async def`` resilient tasks in flight at once.

Celery's prefork pool runs one task per process (a 1 s LLM call idles a ~100 MiB child
for a second); its threads pool holds many tasks but has no time limits, and a thread
per task costs a GIL hand-off at every wait (measured: ~12 ms of CPU per record at 100
in flight); celery-aio-pool awaits one coroutine at a time. This pool keeps Celery's
consumer, protocol, queues, acks, retries, signals and CLI as they are, and changes only
where a task runs:

    Celery's consumer ──► the event loop (one thread): per delivery, a greenlet runs
      (prefetch N)        Celery's tracer (acks, retries, signals); where the task waits
                          for its coroutine, the greenlet hands it to the loop and resumes
                          with the result (SQLAlchemy's asyncio bridge, the same way)

The number in flight never exceeds N (``-c``: N slots, and prefetch N with multiplier 1),
so a slow database or LLM holds messages at the broker, not in memory.

Which waiting task a freed slot goes to (``_Slots``): the oldest of a priority queue
(``aura_priority_queues``; Aura's app: realtime_queue), else the oldest of the others;
but one that has waited ``aura_priority_max_wait`` seconds (5) goes first, so bulk work
moves at least every few seconds under any realtime load (a message held unacked too
long would also meet the broker's consumer timeout). Why: with quorum queues each queue's
consumer has its own prefetch, so a node consuming both work queues holds N of each. In
FIFO order a bulk import took slot after slot -- an ingest runs 10-60 ms and queues an
enrichment -- while the enrichments it queued waited behind it: ingests ran at twice the
rate enrichments could follow, and their statements slowed every task in flight
(bench/RESULTS.md, "The platform path"). Realtime first, each finished enrichment lets
about one ingest in: they run at the same rate.

Per-task time limits, the hard-limit recycle and the loop watchdog are
``aura.messaging._runtime``'s. Blocking calls a task makes (a confirmed publish) block the
loop for their duration: the platform's tasks make theirs in a thread.

``worker_max_tasks_per_child`` (CELERY_WORKER_MAX_TASKS_PER_CHILD) is honoured per task
slot, as prefork's N children each recycle after that many: after that many times N
tasks the process stops taking messages, drains the ones in flight and exits 0 (warm
shutdown), for its supervisor (``aura worker --processes``, Kubernetes) to start afresh.
(Per process, the seed's 1,000 would restart a process holding 100 tasks every 10 s.)
``def`` tasks would run on the loop's thread and block it: keep them on prefork workers.

Use it with ``worker_pool = "aura.messaging.pool:AsyncPool"`` in the app's configuration
(``WORKER_POOL=async`` does that for Aura's app).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import gc
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog
from celery.concurrency.base import BasePool, apply_target

from aura.messaging._runtime import ProcessRuntime, run_in_greenlet, start_threaded

__all__ = ["AsyncPool"]

_log = structlog.get_logger("aura.messaging.pool")
_DRAIN_LIMIT = 3600.0  # bound on a drain; every task also has its own hard limit
_PRIORITY_MAX_WAIT = 5.0  # seconds a waiting task can be passed over


class _Applied:
    """What Celery keeps of an applied task (it only waits on it, if ever)."""

    def __init__(self, future: concurrent.futures.Future[Any]) -> None:
        self.f = future
        self.get = future.result

    def wait(self, timeout: float | None = None) -> None:
        concurrent.futures.wait([self.f], timeout)


class AsyncPool(BasePool):  # type: ignore[misc]
    """Every task of this process on one event loop, each tracer in a greenlet."""

    signal_safe = False
    body_can_be_buffer = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._done = 0
        self._count_lock = threading.Lock()
        self._recycling = False
        self._runtime: ProcessRuntime | None = None
        self._slots: _Slots | None = None
        self._priority_queues: frozenset[str] = frozenset()
        self._in_flight: set[concurrent.futures.Future[Any]] = set()
        self._max_tasks = 0

    def on_start(self) -> None:
        # What start-up made (modules, the app, its tasks: most of the heap) leaves the
        # collector's view: a full collection walked it all, 110-185 ms with every task in
        # flight stalled, ~10 ms after (bench/RESULTS.md, "The platform path").
        gc.collect()
        gc.freeze()
        app = self.app
        runtime = self._runtime = start_threaded(app, self.limit)
        runtime.on_hard_limit = lambda: self._recycle("a task ran past its hard limit")
        hard = app.conf.task_time_limit
        if hard:
            runtime.watch_loop(float(hard), os._exit)
        # Per task slot, as prefork's N children each recycle after this many tasks.
        self._max_tasks = int(app.conf.worker_max_tasks_per_child or 0) * self.limit
        self._priority_queues = frozenset(app.conf.get("aura_priority_queues") or ())
        max_wait = float(app.conf.get("aura_priority_max_wait") or _PRIORITY_MAX_WAIT)
        self._slots = _Slots(self.limit, max_wait=max_wait)

    def on_stop(self) -> None:
        """Drain: every task in flight finishes (or meets its hard limit) first."""
        concurrent.futures.wait(list(self._in_flight), timeout=_DRAIN_LIMIT)
        if self._runtime is not None:
            self._runtime.stop_loop_thread()

    def on_terminate(self) -> None:
        self.on_stop()

    def on_apply(
        self,
        target: Any,
        args: Any = None,
        kwargs: Any = None,
        callback: Any = None,
        accept_callback: Any = None,
        **options: Any,
    ) -> Any:
        runtime, slots = self._runtime, self._slots
        assert runtime is not None
        assert slots is not None
        soft, hard = options.get("soft_timeout"), options.get("timeout")
        first = bool(self._priority_queues) and _queue(args) in self._priority_queues

        async def run() -> None:
            async with slots.held(first=first):
                await run_in_greenlet(
                    apply_target,
                    target,
                    args or (),
                    kwargs or {},
                    callback,
                    accept_callback,
                    soft=soft,
                    hard=hard,
                )

        future = asyncio.run_coroutine_threadsafe(run(), runtime.loop)
        self._in_flight.add(future)
        future.add_done_callback(self._finished)
        return _Applied(future)

    def _finished(self, future: concurrent.futures.Future[Any]) -> None:
        self._in_flight.discard(future)
        if not future.cancelled() and (error := future.exception()) is not None:
            _log.error("a task's tracer failed", error=repr(error))
        with self._count_lock:
            self._done += 1
            due = self._max_tasks and self._done >= self._max_tasks
        if due:
            self._recycle(f"{self._done} tasks done (worker_max_tasks_per_child x slots)")

    def _recycle(self, why: str) -> None:
        """Warm shutdown of this process: stop taking messages, drain, exit 0."""
        if self._recycling:
            return
        self._recycling = True
        _log.warning("recycling the worker process", why=why, pid=os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)

    def _get_info(self) -> Any:
        info = super()._get_info()
        info.update({"max-concurrency": self.limit, "in-flight": len(self._in_flight)})
        return info


def _queue(args: Any) -> str | None:
    """The work queue of a delivery, from Celery's trace arguments (type, id, request
    dict, body, ...): its routing key (a delayed retry's ends with the queue's name)."""
    try:
        routing_key = args[2]["delivery_info"]["routing_key"]
    except (IndexError, KeyError, TypeError):
        return None
    return str(routing_key).rsplit(".", 1)[-1] if routing_key else None


class _Slots:
    """At most ``limit`` holders at once; a freed slot goes to a waiter as the module doc
    says (FIFO within each kind). Used on the pool's loop thread only. ``clock`` is
    monotonic seconds (tests drive a fake one)."""

    def __init__(
        self, limit: int, *, max_wait: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._free = limit
        self._max_wait = max_wait
        self._clock = clock
        # (when it began waiting, its future): priority queues', the others'
        self._first: collections.deque[tuple[float, asyncio.Future[None]]] = collections.deque()
        self._rest: collections.deque[tuple[float, asyncio.Future[None]]] = collections.deque()

    @property
    def free(self) -> int:
        return self._free

    @contextlib.asynccontextmanager
    async def held(self, *, first: bool) -> AsyncIterator[None]:
        await self._acquire(first)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, first: bool) -> None:
        if self._free > 0 and not self._first and not self._rest:
            self._free -= 1
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        (self._first if first else self._rest).append((self._clock(), granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._release()  # granted, then cancelled before it could run: pass it on
            raise

    def _release(self) -> None:
        for waiters in (self._first, self._rest):  # a waiter cancelled meanwhile is skipped
            while waiters and waiters[0][1].done():
                waiters.popleft()
        chosen = self._first or self._rest
        if self._rest and self._first:
            since = self._rest[0][0]
            if self._clock() - since >= self._max_wait and since < self._first[0][0]:
                chosen = self._rest
        if not chosen:
            self._free += 1
            return
        chosen.popleft()[1].set_result(None)
