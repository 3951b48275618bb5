"""A small supervisor for the run's worker: restart it when it exits, count the restarts.

A deployment restarts a crashed worker (Kubernetes restarts the container, systemd the
unit); a chaos run must too, or a worker that died of its fault (``WorkerLostError('Could
not start worker processes')`` when a child is killed during the pool's start-up) leaves
every message queued and the run mistakes "queued" for "lost". Restarts are counted
(``restarts``, ``exit_codes``), bounded (``max_restarts``), and spaced (``backoff_s``).

``cpu_s`` is the CPU time the worker processes used (user + system, the worker and its
pool children, reaped ones included), read from ``/proc`` every 0.2 s while each runs and
once more before it is stopped: a launch killed between two reads loses at most 0.2 s.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable

from aura.worker.process import process_tree_cpu_s, stop_worker_process

__all__ = ["WorkerSupervisor", "process_tree_cpu_s"]


class WorkerSupervisor:
    """Runs ``launch()`` (a worker process) and launches it again whenever it exits,
    until ``stop()``."""

    def __init__(
        self,
        launch: Callable[[], subprocess.Popen[bytes]],
        *,
        backoff_s: float = 0.5,
        max_restarts: int = 30,
    ) -> None:
        self._launch = launch
        self.backoff_s = backoff_s
        self.max_restarts = max_restarts
        self.restarts = 0
        self.exit_codes: list[int] = []
        self.gave_up = False
        self._cpu_done = 0.0  # the launches that ended
        self._cpu_now = 0.0  # the running one, at its last read
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # held only around a launch or a swap, never a wait
        self._watcher = threading.Thread(target=self._watch, name="chaos-supervisor", daemon=True)

    @property
    def pid(self) -> int | None:
        process = self._process
        return None if process is None or process.poll() is not None else process.pid

    @property
    def cpu_s(self) -> float:
        return self._cpu_done + self._cpu_now

    def _sample(self, process: subprocess.Popen[bytes]) -> None:
        used = process_tree_cpu_s(process.pid)
        self._cpu_now = max(self._cpu_now, used)

    def _ended(self) -> None:
        self._cpu_done += self._cpu_now
        self._cpu_now = 0.0

    def start(self) -> None:
        with self._lock:
            self._process = self._launch()
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stopping.is_set():
            process = self._process
            if process is None:
                return
            self._sample(process)
            try:
                code = process.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            if self._stopping.is_set():
                return
            self._ended()
            self.exit_codes.append(code)
            if self.restarts >= self.max_restarts:
                self.gave_up = True
                return
            if self._stopping.wait(self.backoff_s):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self._process = self._launch()
                self.restarts += 1

    def stop(self, *, timeout: float = 60.0) -> None:
        """Stop supervising, then stop the worker (warm shutdown, bounded)."""
        self._stopping.set()
        if self._watcher.is_alive():
            self._watcher.join(timeout=10)
        with self._lock:
            process, self._process = self._process, None
        if process is not None and process.poll() is None:
            self._sample(process)
            stop_worker_process(process, timeout=timeout)
        self._ended()
