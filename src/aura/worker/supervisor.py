"""``aura worker --processes P``: P worker processes on one node, restarted when they exit.

One async worker process holds hundreds of tasks on one core; a node with more cores
runs one per core. The supervisor starts them, restarts one that exits while the node is
running (a recycle after CELERY_WORKER_MAX_TASKS_PER_CHILD tasks exits 0; a crash or a
blocked event loop exits non-zero: both are restarted, counted and logged), and on
SIGTERM or SIGINT passes the signal on and waits for every one to drain.

It gives up (exit 1) when processes keep dying: more than ``max_restarts`` unplanned
(non-zero) exits within ``window`` seconds (a broker that refuses the credentials, say), so a
crash loop is visible to whatever runs the node instead of spinning here. Its own exit
status is 0 only after a clean shutdown.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence
from types import FrameType

import structlog

__all__ = ["Supervisor"]

_log = structlog.get_logger("aura.worker.supervisor")
_POLL = 0.2


class Supervisor:
    """Keeps ``processes`` copies of ``command`` running until told to stop."""

    def __init__(
        self,
        command: Sequence[str],
        env: dict[str, str],
        processes: int,
        *,
        max_restarts: int = 5,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        per_process: Callable[[int], Sequence[str]] = lambda _: (),
    ) -> None:
        self.command = list(command)
        # Arguments of the index-th process (its Celery node name: two workers with one
        # name on a vhost collide on Celery's exclusive pidbox queue, and one exits).
        self.per_process = per_process
        self.env = env
        self.processes = processes
        self.max_restarts = max_restarts
        self.window = window
        self.clock = clock
        self.sleep = sleep
        self.restarts = 0
        self.exit_codes: list[int] = []  # the status of each process restarted, in order
        self._recent: deque[float] = deque()
        self._children: list[subprocess.Popen[bytes]] = []
        self._stopping = False
        self._signal: int = signal.SIGTERM

    def stop(self, signum: int = signal.SIGTERM, _: FrameType | None = None) -> None:
        """Pass ``signum`` on to every process and let them drain (a signal handler)."""
        self._stopping = True
        self._signal = signum
        for child in self._children:
            if child.poll() is None:
                child.send_signal(signum)

    def run(self, *, install_signals: bool = True) -> int:
        """Run until stopped (SIGTERM/SIGINT, or ``stop()`` from another thread)."""
        if install_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, self.stop)
        self._children = [self._spawn(index) for index in range(self.processes)]
        failed = False
        while not (self._stopping and all(c.poll() is not None for c in self._children)):
            for index, child in enumerate(self._children):
                status = child.poll()
                if status is None or self._stopping:
                    continue
                if status != 0 and not self._may_restart():  # a recycle (0) is planned
                    _log.error(
                        "worker processes keep exiting; giving up",
                        restarts=self.restarts,
                        window_s=self.window,
                        status=status,
                    )
                    failed = True
                    self.stop()
                    break
                self.restarts += 1
                self.exit_codes.append(status)
                _log.warning(
                    "worker process exited; restarting it",
                    pid=child.pid,
                    status=status,
                    restarts=self.restarts,
                )
                self._children[index] = self._spawn(index)
            self.sleep(_POLL)
        if failed:
            return 1
        clean = {0, -self._signal}
        return 0 if all(c.returncode in clean for c in self._children) else 1

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        # Our own interpreter and arguments, no shell.
        command = [*self.command, *self.per_process(index)]
        # A session of its own: a Ctrl-C at the terminal reaches us alone, and we pass it on
        # once (twice, Celery would take it for "stop now, abandon the tasks").
        return subprocess.Popen(command, env=self.env, start_new_session=True)  # noqa: S603

    def _may_restart(self) -> bool:
        now = self.clock()
        while self._recent and now - self._recent[0] > self.window:
            self._recent.popleft()
        if len(self._recent) >= self.max_restarts:
            return False
        self._recent.append(now)
        return True
