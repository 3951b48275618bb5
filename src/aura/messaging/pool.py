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

Which waiting task a freed slot goes to (``_Slots``): first, a waiter of the tenant that
holds the fewest slots for its weight (the ``aura_tenant`` header its publisher set;
``aura_tenant_weights``, TENANT_WEIGHTS; a message without the header is one more
"tenant"), so a tenant with two messages here is not behind another's hundred. Then, among
that tenant's waiters: the oldest of a priority queue (``aura_priority_queues``; Aura's
app with TENANT_SCHEDULING=fifo: realtime_queue), else the oldest of the others; but one
that has waited ``aura_priority_max_wait`` seconds (5) goes first, so bulk work
moves at least every few seconds under any realtime load (a message held unacked too
long would also meet the broker's consumer timeout). Why: with quorum queues each queue's
consumer has its own prefetch, so a node consuming both work queues holds N of each. In
FIFO order a bulk import took slot after slot -- an ingest runs 10-60 ms and queues an
enrichment -- while the enrichments it queued waited behind it: ingests ran at twice the
rate enrichments could follow, and their statements slowed every task in flight
(bench/RESULTS.md, "The platform path"). Realtime first, each finished enrichment lets
about one ingest in: they run at the same rate. (With TENANT_SCHEDULING=fair the gateways'
dispatcher keeps the ingests at the enrichments' pace instead, before the broker, and the
realtime-first rule is off: it held a worker's prefetched bulk tasks, and a small
tenant's ingest behind them at the broker, up to the 5 s.)

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
import contextlib
import gc
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import structlog
from celery.concurrency.base import BasePool, apply_target

from aura.messaging._runtime import ProcessRuntime, run_in_greenlet, start_threaded
from aura.messaging.delivery import TENANT_HEADER

__all__ = ["AsyncPool"]

_log = structlog.get_logger("aura.messaging.pool")
_DRAIN_LIMIT = 3600.0  # bound on a drain; every task also has its own hard limit
_PRIORITY_MAX_WAIT = 5.0  # seconds a waiting task can be passed over


class _Applied:
    """What Celery keeps of an applied task: a weak reference it may never use. (Not a
    concurrent future: its condition and chained callbacks were per-delivery work on
    both threads, bench/RESULTS.md "Under a competing CPU load".)"""

    __slots__ = ("__weakref__",)


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
        self._in_flight = 0  # applied and not finished; changed under _drained's lock
        self._drained = threading.Condition()
        # Applied on the consumer thread, started on the loop's: one wake-up of the loop
        # for every burst of deliveries the consumer reads, not one per delivery.
        self._pending: collections.deque[Callable[[], Coroutine[Any, Any, None]]]
        self._pending = collections.deque()
        self._wake_pending = False
        self._tasks: set[asyncio.Task[None]] = set()  # the loop's thread alone touches it
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
        weights = dict(app.conf.get("aura_tenant_weights") or {})
        self._slots = _Slots(
            self.limit, max_wait=max_wait, weight=lambda tenant: weights.get(tenant, 1.0)
        )

    def on_stop(self) -> None:
        """Drain: every task in flight finishes (or meets its hard limit) first."""
        with self._drained:
            self._drained.wait_for(lambda: self._in_flight <= 0, timeout=_DRAIN_LIMIT)
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
        tenant = _tenant(args)

        async def run() -> None:
            async with slots.held(first=first, tenant=tenant):
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

        with self._drained:
            self._in_flight += 1
        self._pending.append(run)
        if not self._wake_pending:  # the loop clears it before it starts what is pending
            self._wake_pending = True
            runtime.loop.call_soon_threadsafe(self._start_pending)
        return _Applied()

    def _start_pending(self) -> None:
        """On the loop's thread: a task for every delivery applied since the last wake."""
        self._wake_pending = False
        loop, pending = asyncio.get_running_loop(), self._pending
        while pending:
            task = loop.create_task(pending.popleft()())
            self._tasks.add(task)  # the loop keeps only a weak reference to a task
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            _log.error("a task's tracer failed", error=repr(error))
        with self._drained:
            self._in_flight -= 1
            if self._in_flight <= 0:
                self._drained.notify_all()
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
        info.update({"max-concurrency": self.limit, "in-flight": self._in_flight})
        return info


def _queue(args: Any) -> str | None:
    """The work queue of a delivery, from Celery's trace arguments (type, id, request
    dict, body, ...): its routing key (a delayed retry's ends with the queue's name)."""
    try:
        routing_key = args[2]["delivery_info"]["routing_key"]
    except (IndexError, KeyError, TypeError):
        return None
    return str(routing_key).rsplit(".", 1)[-1] if routing_key else None


def _tenant(args: Any) -> str | None:
    """The tenant a delivery's message names (``TENANT_HEADER``), from Celery's trace
    arguments; None for a message that names none."""
    try:
        tenant = args[2].get(TENANT_HEADER)
    except (IndexError, AttributeError, TypeError):
        return None
    return tenant if isinstance(tenant, str) and 0 < len(tenant) <= 64 else None


class _Slots:
    """At most ``limit`` holders at once; a freed slot goes to a waiter as the module doc
    says: first to the tenant holding the fewest slots for its weight, then within that
    tenant's waiters by queue kind (FIFO within each). Used on the pool's loop thread
    only. ``clock`` is monotonic seconds (tests drive a fake one)."""

    def __init__(
        self,
        limit: int,
        *,
        max_wait: float,
        clock: Callable[[], float] = time.monotonic,
        weight: Callable[[str | None], float] = lambda tenant: 1.0,
    ) -> None:
        self._free = limit
        self._max_wait = max_wait
        self._clock = clock
        self._weight = weight
        self._holding: collections.Counter[str | None] = collections.Counter()
        # per tenant: (priority queues' waiters, the others'), each (since, future)
        self._waiting: dict[str | None, tuple[_Waiters, _Waiters]] = {}

    @property
    def free(self) -> int:
        return self._free

    def holding(self, tenant: str | None) -> int:
        return self._holding[tenant]

    @contextlib.asynccontextmanager
    async def held(self, *, first: bool, tenant: str | None = None) -> AsyncIterator[None]:
        await self._acquire(first, tenant)
        try:
            yield
        finally:
            self._give_back(tenant)

    async def _acquire(self, first: bool, tenant: str | None) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            self._holding[tenant] += 1
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queues = self._waiting.setdefault(tenant, (collections.deque(), collections.deque()))
        queues[0 if first else 1].append((self._clock(), granted))
        if self._free > 0:  # free slots, and only cancelled waiters before this one
            self._grant()
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._give_back(tenant)  # granted, then cancelled before it could run
            raise

    def _give_back(self, tenant: str | None) -> None:
        self._holding[tenant] -= 1
        if self._holding[tenant] <= 0:
            del self._holding[tenant]
        self._free += 1
        self._grant()

    def _grant(self) -> None:
        """Give free slots to waiters: the least-served tenant's, as the class doc says."""
        while self._free > 0:
            tenant = self._next_tenant()
            if tenant is _NOBODY:
                return
            first, rest = self._waiting[tenant]  # type: ignore[index]
            chosen = first or rest
            if rest and first:
                since = rest[0][0]
                if self._clock() - since >= self._max_wait and since < first[0][0]:
                    chosen = rest
            granted = chosen.popleft()[1]
            if not first and not rest:
                del self._waiting[tenant]  # type: ignore[arg-type]
            self._free -= 1
            self._holding[tenant] += 1  # type: ignore[index]
            granted.set_result(None)

    def _next_tenant(self) -> object:
        """The waiting tenant with the fewest slots for its weight (the oldest waiter on a
        tie); waiters cancelled meanwhile are dropped first."""
        best: object = _NOBODY
        best_key: tuple[float, float] | None = None
        for tenant in list(self._waiting):
            queues = self._waiting[tenant]
            for waiters in queues:
                while waiters and waiters[0][1].done():
                    waiters.popleft()
            if not queues[0] and not queues[1]:
                del self._waiting[tenant]
                continue
            oldest = min(w[0][0] for w in queues if w)
            key = (self._holding[tenant] / self._weight(tenant), oldest)
            if best_key is None or key < best_key:
                best, best_key = tenant, key
        return best


_Waiters = collections.deque[tuple[float, asyncio.Future[None]]]
_NOBODY = object()
