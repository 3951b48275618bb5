"""Starting and stopping a real worker process (prefork), for the demo, tests and benches.

``aura worker`` is how a deployment runs one; this is for programs that need a worker of
their own for a while and must not leave it behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import click

from aura.contract import PLATFORM_QUEUES

__all__ = ["process_tree_cpu_s", "run_worker", "start_worker_process", "stop_worker_process"]


def run_worker(app: Any, argv: Sequence[str]) -> int:
    """Run ``celery worker`` in this process and return its exit status.

    ``Celery.worker_main`` drops the status (it runs click with ``standalone_mode=False``
    and ignores what comes back), so a worker that stopped on an unrecoverable error
    exited 0 and a supervisor saw a clean shutdown. This returns it instead.
    """
    from celery.bin.celery import celery

    celery.params[0].default = app  # what Celery.start does: ``-A`` defaults to this app
    try:
        code = celery.main(args=["worker", *argv], standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    finally:
        celery.params[0].default = None
    return code if isinstance(code, int) else 0


def start_worker_process(
    app_module: str,
    env: dict[str, str],
    output: IO[bytes] | IO[str] | int | None = subprocess.DEVNULL,
    *,
    concurrency: int = 2,
    queues: Sequence[str] = PLATFORM_QUEUES,
    cwd: Path | None = None,
    pool: str = "prefork",
    hostname: str | None = None,
) -> subprocess.Popen[bytes]:
    """``celery -A app_module worker`` with ``pool`` (prefork: ``concurrency`` child
    processes; async: ``concurrency`` tasks in flight in one process), its output
    (stdout and stderr) to ``output``. Two workers on one vhost need distinct
    ``hostname`` s (Celery's node names: the second ``celery@host`` exits at start)."""
    env = {**env, "WORKER_POOL": pool}  # the app reads its pool from Settings
    command = [sys.executable, "-m", "celery", "-A", app_module, "worker"]
    command += ["-c", str(concurrency), "-Q", ",".join(queues), "--without-heartbeat"]
    command += ["--without-gossip", "--without-mingle", "-l", "WARNING"]
    if hostname:
        command += ["-n", hostname]
    # Our own interpreter and arguments, no shell.
    return subprocess.Popen(  # noqa: S603
        command, env=env, cwd=cwd, stdout=output, stderr=subprocess.STDOUT
    )


def stop_worker_process(process: subprocess.Popen[bytes], *, timeout: float = 60.0) -> None:
    """Warm shutdown (SIGTERM: running tasks finish), bounded; killed past ``timeout``."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid``, its reaped children and its live children (0 when gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0.0
    # After the ")": state is field 3, utime..cstime are fields 14..17 (1-based).
    ticks = sum(int(value) for value in fields[11:15])
    return ticks / _TICKS + sum(process_tree_cpu_s(int(child)) for child in children)
