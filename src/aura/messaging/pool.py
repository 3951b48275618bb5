"""``AsyncPool``: one worker process, many ``async def`` resilient tasks in flight at once.

Celery's prefork pool runs one task per process (a 1 s LLM call idles a ~100 MiB child
for a second); its threads pool holds many tasks but has no time limits; celery-aio-pool
awaits one coroutine at a time. This pool keeps Celery's consumer, protocol, queues,
acks, retries, signals and CLI as they are, and changes only where a task runs:

    Celery's consumer ──► N pool threads ──► this process's event loop (one thread)
      (prefetch N)          (Celery's tracer:     (every task's coroutine; the database,
                            acks, retries)         Redis and HTTP clients are shared)

A thread costs a few KiB and blocks on its coroutine's future, so N (``-c``) can be
hundreds; the number in flight never exceeds N, and prefetch is N (multiplier 1), so a
slow database or LLM holds messages at the broker, not in memory. Per-task time limits,
the hard-limit recycle and the loop watchdog are ``aura.messaging.runtime``'s.

``worker_max_tasks_per_child`` (CELERY_WORKER_MAX_TASKS_PER_CHILD) is honoured per task
slot, as prefork's N children each recycle after that many: after that many times N
tasks the process stops taking messages, drains the ones in flight and exits 0 (warm
shutdown), for its supervisor (``aura worker --processes``, Kubernetes) to start afresh.
(Per process, the seed's 1,000 would restart a process holding 100 tasks every 10 s.)
``def`` tasks run in their thread, without time limits: keep them on prefork workers.

Use it with ``-P aura.messaging.pool:AsyncPool`` or ``worker_pool`` in the app's
configuration.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import structlog
from celery.concurrency.thread import TaskPool

from aura.messaging.runtime import start_threaded

__all__ = ["AsyncPool"]

_log = structlog.get_logger("aura.messaging.pool")


class AsyncPool(TaskPool):  # type: ignore[misc]
    """Celery's thread pool, with the tasks' coroutines on one shared event loop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._done = 0
        self._count_lock = threading.Lock()
        self._recycling = False
        self._runtime: Any = None

    def on_start(self) -> None:
        app = self.app
        self._runtime = start_threaded(app, self.limit)
        self._runtime.on_hard_limit = lambda: self._recycle("a task ran past its hard limit")
        hard = app.conf.task_time_limit
        if hard:
            self._runtime.watch_loop(float(hard), os._exit)
        # Per task slot, as prefork's N children each recycle after this many tasks.
        self._max_tasks = int(app.conf.worker_max_tasks_per_child or 0) * self.limit
        super().on_start()

    def on_stop(self) -> None:
        self.executor.shutdown(wait=True)  # drain: every task in flight finishes or fails
        if self._runtime is not None:
            self._runtime.stop_loop_thread()
        super().on_stop()

    def on_apply(
        self,
        target: Any,
        args: Any = None,
        kwargs: Any = None,
        callback: Any = None,
        accept_callback: Any = None,
        **options: Any,
    ) -> Any:
        runtime = self._runtime
        soft, hard = options.get("soft_timeout"), options.get("timeout")

        def limited(*call_args: Any, **call_kwargs: Any) -> Any:
            with runtime.task_limits(soft, hard):  # per task, read by runtime.run
                return target(*call_args, **call_kwargs)

        def counted(*result: Any) -> None:
            try:
                if callback is not None:
                    callback(*result)
            finally:
                self._count_one()

        return super().on_apply(limited, args, kwargs, counted, accept_callback, **options)

    def _count_one(self) -> None:
        with self._count_lock:
            self._done += 1
            due = self._max_tasks and self._done >= self._max_tasks
        if due:
            self._recycle(f"{self._done} tasks done (worker_max_tasks_per_child)")

    def _recycle(self, why: str) -> None:
        """Warm shutdown of this process: stop taking messages, drain, exit 0."""
        if self._recycling:
            return
        self._recycling = True
        _log.warning("recycling the worker process", why=why, pid=os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)

    def _get_info(self) -> Any:
        info = super()._get_info()
        info["aura-async"] = True
        return info
