"""``aura worker``'s supervisor: with --processes N each process of the node gets its own
Celery node name (on one name, Celery's exclusive pidbox queue lets only one of them run);
alone, its one process is restarted when it dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from aura.worker.supervisor import Supervisor
from tests.helpers import wait_for, wait_until

_CHILD = (
    "import pathlib, sys, time\n"
    "pathlib.Path(sys.argv[1], sys.argv[-1].replace('@', '_').replace('%', '')).touch()\n"
    "time.sleep(120)\n"
)


async def test_each_process_of_a_node_gets_its_own_name(tmp_path: Path) -> None:
    supervisor = Supervisor(
        [sys.executable, "-c", _CHILD, str(tmp_path)],
        {},
        3,
        per_process=lambda i: ["--hostname", f"aura{i + 1}@%h"],
    )
    result: list[int] = []
    thread = threading.Thread(
        target=lambda: result.append(supervisor.run(install_signals=False)), daemon=True
    )
    thread.start()
    try:

        async def all_started() -> bool:
            return len(os.listdir(tmp_path)) == 3

        await wait_until(all_started, within=30)
    finally:
        supervisor.stop()
        thread.join(30)
    assert sorted(os.listdir(tmp_path)) == ["aura1_h", "aura2_h", "aura3_h"]
    assert result == [0]  # stopped by us: a clean shutdown


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def test_a_lone_aura_worker_restarts_its_process_and_stops_cleanly(
    amqp_url: str, redis_url: str, pg_url: str, tmp_path: Path
) -> None:
    """``aura worker`` (one process, no --processes) restarts a worker process that dies
    (it used to stay down: nothing supervised a lone worker); --no-restart opts out."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "REDIS_"))},
        "CELERY_BROKER_URL": amqp_url,
        "REDIS_URL": redis_url,
        "DATABASE_URL": pg_url,
        "WORKER_METRICS_PORT": "0",
        "WORKER_CONCURRENCY": "4",
    }
    log = (tmp_path / "worker.log").open("wb")
    node = subprocess.Popen(
        [sys.executable, "-m", "aura", "worker"], env=env, stdout=log, stderr=log
    )
    try:
        wait_for(lambda: len(_children(node.pid)) == 1, within=30)
        (first,) = _children(node.pid)
        os.kill(first, signal.SIGKILL)  # a crash: no goodbye
        wait_for(lambda: _children(node.pid) not in ([], [first]), within=30)
        assert node.poll() is None
    finally:
        node.send_signal(signal.SIGTERM)
        status = node.wait(60)
        log.close()
    output = (tmp_path / "worker.log").read_text()
    assert "worker process exited; restarting it" in output, output[-3000:]
    assert status == 0, output[-3000:]  # stopped by us: a clean shutdown
