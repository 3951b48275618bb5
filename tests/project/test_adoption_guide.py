"""docs/adoption.md runs as written: its Python blocks, in order, as one script (in a
process of its own, on the in-memory broker and a SQLite file); then the task it defines
is sent a poison pill, which must land in the DLQ."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from aura.db import Database

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "adoption.md"

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


def _service_env(tmp_path: Path, **values: str) -> dict[str, str]:
    kept = {k: v for k, v in os.environ.items() if not k.startswith(_SERVICE_VARIABLES)}
    return {**kept, "PYTHONPATH": str(tmp_path), "AURA_ENV_FILE": "", **values}


_SERVICE_VARIABLES = ("CELERY_", "DATABASE_", "REDIS_", "LLM_", "WORKER_")


def _python(env: dict[str, str], cwd: Path, code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.mark.timeout(240)
def test_the_guides_app_on_a_real_worker_with_one_replay(
    tmp_path: Path, amqp_url: str, pg_url: str, pg_database: Database, redis_url: str
) -> None:
    """The guide's code as the module ``shop`` (its sending line left out: a worker
    imports the module), a real ``celery -A shop worker`` and the LLM simulator: the
    guide's order gets its blurb (it ended in the DLQ: nothing made the order), a poison
    pill, and the guide's ``replay_poison_pills``: the letter goes back to shop_orders
    and, the bug unfixed, lands in the DLQ again with replay count 1."""
    from kombu.connection import Connection

    from aura.llm import Faults, LLMSimulator
    from aura.messaging import DeadLetterQueue
    from aura.worker.process import start_worker_process, stop_worker_process
    from tests.helpers import wait_for

    blocks = re.findall(r"^```python\n(.*?)^```", GUIDE.read_text(), flags=re.M | re.S)
    (tmp_path / "shop.py").write_text("\n".join(b for b in blocks if ".delay(" not in b))
    simulator = LLMSimulator(Faults(latency=0.01), seed=7).running_in_thread()
    sim = simulator.__enter__()
    env = _service_env(
        tmp_path, CELERY_BROKER_URL=amqp_url, DATABASE_URL=pg_url, REDIS_URL=redis_url,
        WORKER_METRICS_PORT="0", LOG_LEVEL="WARNING", LLM_BASE_URL=sim.base_url,
    )  # fmt: skip
    log = tmp_path / "worker.log"
    with log.open("wb") as output:  # it starts while the guide's tables are made
        worker = start_worker_process(
            "shop", env, output, queues=["shop_orders", "shop_mail"], cwd=tmp_path
        )
    try:
        # The guide's way without Alembic: its tables made once (the inbox is there
        # already); then its order and a poison pill, sent by the guide's task
        order, message_id = _python(env, tmp_path, _CREATE_ALL + _SEND).split()
        blurb = _read_blurb(pg_url)  # the LLM's answer, stored with the order it made
        wait_for(lambda: blurb() is not None, within=90, interval=0.05)
        assert order
        assert blurb() != "None"
        with Connection(amqp_url) as connection:
            dlq = DeadLetterQueue(connection)

            def mine() -> list[Any]:
                found = dlq.list(task="shop.describe", limit=1000)
                return [x for x in found if x.message_id == message_id]

            wait_for(lambda: len(mine()) == 1, within=90)
            (first,) = mine()
            assert (first.reason.value, first.queue, first.replay_count) == (
                "poison_pill", "shop_orders", 0,
            )  # fmt: skip
            shown = _python(env, tmp_path, "import shop; print(shop.replay_poison_pills())")
            assert shown.strip().splitlines()[-1] == "1"
            wait_for(lambda: [x.replay_count for x in mine()] == [1], within=90)
            assert mine()[0].id == first.id
            assert [r["operator"] for r in dlq.replays(first.id)] == ["shop-oncall"]
    finally:
        stop_worker_process(worker, timeout=30)
        simulator.__exit__(None, None, None)
        _on_pg(pg_url, lambda db: db.execute("DROP TABLE IF EXISTS shop_orders"))  # shared
    assert worker.returncode == 0, log.read_text()[-3000:]


def _on_pg(pg_url: str, work: Callable[[Any], Awaitable[Any]]) -> Any:
    """``work(connection)`` on the run's database, from this process (asyncpg, on a loop
    of its own in a thread: the test's loop is pytest-asyncio's)."""
    import asyncpg

    async def run() -> Any:
        connection = await asyncpg.connect(pg_url.replace("+asyncpg", ""), timeout=10)
        try:
            return await work(connection)
        finally:
            await connection.close()

    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, run()).result(timeout=60)


def _read_blurb(pg_url: str) -> Callable[[], str | None]:
    """The guide's order's blurb as stored (``"None"`` for a NULL one), None before the
    order exists."""

    def read() -> str | None:
        query = "SELECT blurb FROM shop_orders WHERE id = 'o-guide'"
        rows = _on_pg(pg_url, lambda db: db.fetch(query))
        return str(rows[0]["blurb"]) if rows else None

    return read


_CREATE_ALL = """
import asyncio, os
from sqlalchemy.ext.asyncio import create_async_engine
import shop

async def main():
    engine = create_async_engine(os.environ["DATABASE_URL"])
    async with engine.begin() as connection:
        await connection.run_sync(shop.Base.metadata.create_all)
    await engine.dispose()

asyncio.run(main())
"""
_SEND = """
import json
print(shop.describe.delay(json.dumps({"order_id": "o-guide", "item": "trail shoe"})).id)
print(shop.describe.delay("{not json").id)
"""


@pytest.mark.timeout(120)
async def test_the_guides_alembic_steps_make_its_tables_in_a_database_of_their_own(
    tmp_path: Path, pg_url: str
) -> None:
    """The guide's Alembic step as written: ``alembic init -t async``, env.py given the
    models and DATABASE_URL, autogenerate, ``upgrade head`` -- on a database of the test's
    own (the run's has the platform's tables) -- makes the app's table and the inbox."""
    import asyncpg

    from tests import services

    blocks = re.findall(r"^```python\n(.*?)^```", GUIDE.read_text(), flags=re.M | re.S)
    (tmp_path / "shop.py").write_text("\n".join(b for b in blocks if ".delay(" not in b))
    name = f"{services.PG_TEST_DATABASE}_alembic"[:63]
    admin = await asyncpg.connect(services.PG_ADMIN_DSN, timeout=10)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = pg_url.rsplit("/", 1)[0] + f"/{name}"
        env = _service_env(tmp_path, DATABASE_URL=url, CELERY_BROKER_URL="memory://localhost/")

        def alembic(*args: str) -> str:
            done = subprocess.run(
                [sys.executable, "-m", "alembic", *args], cwd=tmp_path, env=env,
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stdout + done.stderr[-3000:]
            return done.stdout + done.stderr

        alembic("init", "-t", "async", "migrations")
        env_py = tmp_path / "migrations" / "env.py"
        text = env_py.read_text()
        assert "target_metadata = None" in text  # the template the guide speaks of
        text = text.replace(
            "target_metadata = None", "from shop import Base\n\ntarget_metadata = Base.metadata"
        )
        text = text.replace(
            "config = context.config",
            "config = context.config\n"
            'config.set_main_option("sqlalchemy.url", os.environ["DATABASE_URL"])',
        )
        env_py.write_text("import os\n" + text)
        made = alembic("revision", "--autogenerate", "-m", "orders and the inbox")
        assert "shop_orders" in made
        assert "processed_messages" in made
        alembic("upgrade", "head")
        database = await asyncpg.connect(url.replace("+asyncpg", ""), timeout=10)
        try:
            tables = {
                row["tablename"]
                for row in await database.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                )
            }
        finally:
            await database.close()
        assert {"shop_orders", "processed_messages", "alembic_version"} <= tables
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
