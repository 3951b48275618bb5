"""The database out of connections for a while under a real worker (the async pool, an
app of the test's own): deliveries wait at the process's outage gate -- no "LLM call", no
retry, no dead letter -- and every message is committed exactly once soon after the
database takes connections again.

"Every slot taken" is made with a role of the test's own whose CONNECTION LIMIT is 0
(PostgreSQL answers "too many connections for role", SQLSTATE 53300, as it answers "too
many clients" when max_connections is reached): the server's own settings are never
touched. The role is dropped at the end."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
from kombu import Connection
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from aura.catalog import upgrade
from aura.db import Database
from aura.messaging import DeadLetterQueue
from aura.worker.process import start_worker_process
from tests.helpers import stop_celery_worker, wait_for
from tests.outage_tasks import QUEUE, TASK, app

pytestmark = pytest.mark.timeout(180)
MESSAGES = 30
# The soft limit is below the 3 s a checkout may wait for the pool (CHECKOUT_BOUND): a
# delivery's first try spends that before it is held, and both are given back when it is
# let through (before, only the hold was: at 2.5 s these deliveries met their soft limit).
SOFT_LIMIT_S, HARD_LIMIT_S = 2.5, 3.5


@pytest.fixture
async def limited_role(pg_url: str) -> AsyncIterator[tuple[str, str]]:
    """(admin URL, the role's URL): a login role of the test's own on the run's database,
    with rights on its tables."""
    role = f"aura_gate_{uuid.uuid4().hex[:10]}"
    database = Database(pg_url)
    await upgrade(database)
    await database.dispose()
    admin = create_async_engine(pg_url, isolation_level="AUTOCOMMIT")
    name = make_url(pg_url).database
    statements = (
        f"CREATE ROLE {role} LOGIN",
        f'GRANT ALL ON DATABASE "{name}" TO {role}',
        f"GRANT ALL ON SCHEMA public TO {role}",
        f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}",
        # The test's own table, in a schema of its own (not the models' migrations).
        "CREATE SCHEMA IF NOT EXISTS aura_outage_tests",
        "CREATE TABLE IF NOT EXISTS aura_outage_tests.orders "
        "(message_id TEXT NOT NULL, run TEXT NOT NULL)",
        f"GRANT ALL ON SCHEMA aura_outage_tests TO {role}",
        f"GRANT ALL ON ALL TABLES IN SCHEMA aura_outage_tests TO {role}",
        f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}",
    )
    async with admin.connect() as connection:
        for statement in statements:
            await connection.execute(text(statement))
    try:
        yield pg_url, make_url(pg_url).set(username=role).render_as_string(hide_password=False)
    finally:
        async with admin.connect() as connection:
            await connection.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :r"),
                {"r": role},
            )
            await connection.execute(text(f"DROP OWNED BY {role}"))
            await connection.execute(text("DROP SCHEMA IF EXISTS aura_outage_tests CASCADE"))
            await connection.execute(text(f"DROP ROLE IF EXISTS {role}"))
        await admin.dispose()


async def _sql(url: str, statement: str) -> list[tuple[object, ...]]:
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            result = await connection.execute(text(statement))
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        await engine.dispose()


async def test_every_slot_taken_holds_deliveries_then_each_commits_once(
    limited_role: tuple[str, str], amqp_url: str, redis_url: str, tmp_path: Path
) -> None:
    admin_url, role_url = limited_role
    role = make_url(role_url).username
    run = uuid.uuid4().hex
    await _sql(admin_url, f"ALTER ROLE {role} CONNECTION LIMIT 0")  # every slot taken
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "REDIS_"))},
        "CELERY_BROKER_URL": amqp_url,
        "REDIS_URL": redis_url,
        "DATABASE_URL": role_url,
        "DB_CONNECT_TIMEOUT": "2",
        # Shorter than the outage: a held delivery's limits start when it may run
        "CELERY_TASK_SOFT_TIME_LIMIT": str(SOFT_LIMIT_S),
        "CELERY_TASK_HARD_TIME_LIMIT": str(HARD_LIMIT_S),
    }
    log = tmp_path / "worker.log"
    with log.open("wb") as output:
        worker = start_worker_process(
            "tests.outage_tasks",
            {"WORKER_METRICS_PORT": "0", **env},
            output,
            pool="async",
            concurrency=20,
            queues=[QUEUE],
        )
    counter = redis.Redis.from_url(redis_url)
    app.conf.broker_url = amqp_url  # the test's side of its app: the run's own vhost
    try:
        ids = [app.send_task(TASK, args=[run], queue=QUEUE).id for _ in range(MESSAGES)]
        try:
            wait_for(lambda: "holding deliveries until it answers" in log.read_text(), within=60)
        except AssertionError:
            print(log.read_text()[-6000:])
            raise
        down_until = time.monotonic() + HARD_LIMIT_S + 2.0  # the outage, from the first hold
        while time.monotonic() < down_until:
            assert counter.get(f"{run}:calls") is None, "an LLM call while the database was out"
            await asyncio.sleep(0.5)
        assert worker.poll() is None

        await _sql(admin_url, f"ALTER ROLE {role} CONNECTION LIMIT -1")  # slots free again
        recovered = time.monotonic()

        async def committed() -> int:
            rows = await _sql(
                admin_url, f"SELECT count(*) FROM aura_outage_tests.orders WHERE run = '{run}'"
            )
            return int(rows[0][0])  # type: ignore[call-overload]

        while await committed() < MESSAGES:
            assert time.monotonic() - recovered < 60, log.read_text()[-3000:]
            await asyncio.sleep(0.2)
        print(f"\nall {MESSAGES} committed {time.monotonic() - recovered:.2f} s after recovery")
        rows = await _sql(
            admin_url,
            "SELECT message_id, count(*) FROM aura_outage_tests.orders "
            f"WHERE run = '{run}' GROUP BY 1",
        )
        assert sorted(str(m) for m, _ in rows) == sorted(ids)
        assert {int(n) for _, n in rows} == {1}  # type: ignore[call-overload]
        assert int(counter.get(f"{run}:calls") or 0) == MESSAGES  # one call each, none held
        text_logged = log.read_text()
        assert "task failed; retrying" not in text_logged  # no retry budget spent
        assert "put off before running" not in text_logged  # held, never deferred
        with Connection(amqp_url) as connection:
            letters = DeadLetterQueue(connection).list(limit=1000)
        assert [x for x in letters if x.message_id in ids] == []
        assert worker.poll() is None
    finally:
        stop_celery_worker(worker)
        counter.close()
    assert worker.returncode == 0, log.read_text()[-3000:]
