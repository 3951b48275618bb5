"""Starting and stopping a real worker process (prefork), for the demo, tests and benches.

``aura worker`` is how a deployment runs one; this is for programs that need a worker of
their own for a while and must not leave it behind.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from aura.messaging.topology import BULK_QUEUE, REALTIME_QUEUE

__all__ = ["start_worker_process", "stop_worker_process"]


def start_worker_process(
    app_module: str,
    env: dict[str, str],
    output: IO[bytes] | IO[str] | int | None = subprocess.DEVNULL,
    *,
    concurrency: int = 2,
    queues: Sequence[str] = (REALTIME_QUEUE, BULK_QUEUE),
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """``celery -A app_module worker`` with the prefork pool (time limits work only
    there), its output (stdout and stderr) to ``output``."""
    command = [sys.executable, "-m", "celery", "-A", app_module, "worker", "-P", "prefork"]
    command += ["-c", str(concurrency), "-Q", ",".join(queues), "--without-heartbeat"]
    command += ["--without-gossip", "--without-mingle", "-l", "WARNING"]
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
