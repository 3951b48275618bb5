"""``aura worker --processes N``: each process of the node gets its own Celery node name
(on one name, Celery's exclusive pidbox queue lets only one of them run)."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from aura.worker.supervisor import Supervisor
from tests.helpers import wait_until

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
