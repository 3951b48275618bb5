"""docs/adoption.md runs as written: its Python blocks, in order, as one script (in a
process of its own, on the in-memory broker and a SQLite file); then the task it defines
is sent a poison pill, which must land in the DLQ."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "adoption.md"

_AFTER = """
# -- the test's own checks, after the guide's code --
from aura.messaging import DeadLetterQueue
assert app.conf.task_default_queue == "shop_orders"
assert {q.name for q in app.conf.task_queues} == {"shop_orders", "shop_mail"}
assert describe.app is app and describe.name == "shop.describe"
assert "processed_messages" in Base.metadata.tables
app.conf.task_always_eager = True
describe.apply(args=("{not json",), task_id="guide-poison-1")
with app.connection_for_write() as connection:
    letters = DeadLetterQueue(connection).list(task="shop.describe")
assert [(x.message_id, x.reason.value) for x in letters] == [("guide-poison-1", "poison_pill")]
print("guide ok")
"""


def test_the_guides_code_runs_as_written(tmp_path: Path) -> None:
    blocks = re.findall(r"^```python\n(.*?)^```", GUIDE.read_text(), flags=re.M | re.S)
    assert len(blocks) >= 4
    script = tmp_path / "guide.py"
    script.write_text("\n".join(blocks) + _AFTER)
    env = {
        "PATH": "/usr/bin:/bin",
        "CELERY_BROKER_URL": "memory://localhost/",
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'shop.db'}",
        "LOG_LEVEL": "WARNING",
        "AURA_ENV_FILE": "",
    }
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip().endswith("guide ok")
