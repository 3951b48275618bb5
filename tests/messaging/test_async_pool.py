"""The async pool on the real services: many ``async def`` tasks in flight in one worker
process, every guarantee per task (soft limit with cleanup, hard limit with requeue and
recycle, the seed's tasks-per-child recycle, a drained shutdown), under the supervisor
``aura worker --processes`` uses."""

from __future__ import annotations

import os
import sys
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from kombu.connection import Connection
from sqlalchemy import text

from aura.config import Settings
from aura.db import Database
from aura.messaging import DeadLetter, DeadLetterQueue
from aura.worker.celery_app import make_celery_app
from aura.worker.supervisor import Supervisor
from tests import services
from tests.delivery_tasks import EFFECTS_TABLE
from tests.helpers import wait_for, wait_until

pytestmark = pytest.mark.timeout(240)
TASKS = "tests.delivery_tasks"
CONCURRENCY = 60


@dataclass
class Node:
    supervisor: Supervisor
    thread: threading.Thread
    amqp_url: str
    redis: redis.Redis
    database: Database
    app: Any = field(init=False)

    def __post_init__(self) -> None:
        self.app = make_celery_app(Settings(celery_broker_url=self.amqp_url))

    def send(self, task: str, *args: object, task_id: str | None = None, **limits: float) -> str:
        sent = self.app.send_task(f"{TASKS}.{task}", args=list(args), task_id=task_id, **limits)
        return str(sent.id)

    async def committed(self, run: str) -> dict[str, int]:
        async with self.database.session() as session:
            rows = (
                await session.execute(
                    text(
                        "SELECT message_id, count(*) FROM aura_tests.delivery_effects "
                        "WHERE run = :r GROUP BY message_id"
                    ),
                    {"r": run},
                )
            ).all()
        return {str(m): int(n) for m, n in rows}

    def letters(self, run: str) -> list[DeadLetter]:
        with Connection(self.amqp_url) as connection:
            found = DeadLetterQueue(connection).list(limit=10_000)
        return [letter for letter in found if run in letter.task_args]

    def count(self, key: str) -> int:
        return int(self.redis.get(key) or 0)


@pytest.fixture(scope="module")
async def node(
    amqp_url: str, pg_url: str, pg_database: Database, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Node]:
    own_redis = services.OwnRedis(str(tmp_path_factory.mktemp("redis")))
    own_redis.start()
    async with pg_database.session() as session:
        for statement in EFFECTS_TABLE:
            await session.execute(text(statement))
        await session.commit()
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CELERY_", "REDIS_", "DATABASE_", "WORKER_"))
        },
        "CELERY_BROKER_URL": amqp_url,
        "REDIS_URL": own_redis.url,
        "DATABASE_URL": pg_url,
        "WORKER_POOL": "async",
        "CELERY_TASK_SOFT_TIME_LIMIT": "2",
        "CELERY_TASK_HARD_TIME_LIMIT": "4",
        "CELERY_WORKER_MAX_TASKS_PER_CHILD": "3",  # per slot: 180 tasks per process
        "RETRY_TRACKER_MAX_RETRIES": "2",
    }
    command = [sys.executable, "-m", "celery", "-A", TASKS, "worker", "-c", str(CONCURRENCY)]
    command += ["-Q", "realtime_queue,bulk_queue", "--without-heartbeat", "--without-gossip"]
    command += ["--without-mingle", "-l", "WARNING"]
    supervisor = Supervisor(command, env, 1, max_restarts=20)
    result: list[int] = []
    thread = threading.Thread(
        target=lambda: result.append(supervisor.run(install_signals=False)), daemon=True
    )
    thread.start()
    running = Node(supervisor, thread, amqp_url, redis.Redis.from_url(own_redis.url), pg_database)
    try:
        run = uuid.uuid4().hex
        running.send("effect", run, "ready")
        await wait_until(lambda: _has(running, run, 1), within=60)
        yield running
    finally:
        supervisor.stop()
        thread.join(60)
        running.redis.close()
        own_redis.stop()
    assert result == [0], "the node did not shut down cleanly"


async def _has(node: Node, run: str, n: int) -> bool:
    return len(await node.committed(run)) == n


async def test_one_process_holds_its_whole_concurrency_in_flight(node: Node) -> None:
    run = uuid.uuid4().hex
    sent = {node.send("barrier", run, CONCURRENCY) for _ in range(CONCURRENCY)}
    await wait_until(lambda: _has(node, run, CONCURRENCY), within=90)
    assert set(await node.committed(run)) == sent  # all were in flight at once


async def test_the_soft_limit_cancels_one_task_and_its_cleanup_runs(node: Node) -> None:
    run = uuid.uuid4().hex
    # The node's limits are its environment's; this message's own soft limit (kept by its
    # retries) is below them: the same timer in the pool, sooner.
    (conf,) = node.app.control.inspect(timeout=10, limit=1).conf().values()
    assert (conf["task_soft_time_limit"], conf["task_time_limit"]) == (2, 4)
    node.send("sleepy", run, 30.0, soft_time_limit=0.5)
    others = {node.send("effect", run, f"n{i}", 0, 0.2) for i in range(20)}
    wait_for(lambda: len(node.letters(run)) == 1, within=120)
    (letter,) = node.letters(run)
    assert letter.reason.value == "max_retries_exceeded"
    assert "SoftTimeLimitExceeded" in letter.error_type
    assert node.count(f"{run}:attempts") == 3  # max_retries 2: three tries
    assert node.count(f"{run}:cleaned") == 3  # each cancelled, each cleaned up
    await wait_until(lambda: _has(node, run, 20), within=60)
    assert set(await node.committed(run)) == others


async def test_past_the_hard_limit_a_task_is_requeued_and_its_process_recycled(
    node: Node,
) -> None:
    run = uuid.uuid4().hex
    restarts = node.supervisor.restarts
    # The message's own limits (kept by its redeliveries), below the node's 2 s / 4 s
    node.send("stubborn", run, 60.0, soft_time_limit=0.5, time_limit=1)
    wait_for(lambda: len(node.letters(run)) == 1, within=150)
    (letter,) = node.letters(run)
    assert letter.reason.value == "worker_lost"  # as after prefork's kill, budget spent
    assert node.count(f"{run}:ignored") >= 1  # it did swallow the soft limit
    assert node.supervisor.restarts > restarts  # each hard limit recycled the process
    after = uuid.uuid4().hex
    node.send("effect", after, "still serving")
    await wait_until(lambda: _has(node, after, 1), within=60)


async def test_tasks_per_child_recycles_without_losing_or_doubling_anything(
    node: Node,
) -> None:
    run = uuid.uuid4().hex
    restarts = node.supervisor.restarts
    sent = {node.send("effect", run, f"n{i}", 0, 0.05) for i in range(600)}
    await wait_until(lambda: _has(node, run, 600), within=180)
    committed = await node.committed(run)
    assert set(committed) == sent
    assert set(committed.values()) == {1}
    # 3 per slot x 60 slots: a process recycles after 180 tasks (plus the <= 60 already
    # in flight, which it drains first), so 600 tasks recycle it at least twice.
    wait_for(lambda: node.supervisor.restarts >= restarts + 2, within=60)
    assert node.letters(run) == []


async def test_many_dead_letters_at_once_never_stall_the_loop(node: Node) -> None:
    run = uuid.uuid4().hex
    exits = len(node.supervisor.exit_codes)
    for i in range(40):  # a poison pill each (a count that is not a number): 40 letters at once
        node.send("effect", run, f"n{i}", "not a count")
    wait_for(lambda: len(node.letters(run)) == 40, within=90)
    assert {letter.reason.value for letter in node.letters(run)} == {"poison_pill"}
    # No blocked loop (the watchdog's exit 70), no crash; a planned recycle (exit 0,
    # CELERY_WORKER_MAX_TASKS_PER_CHILD x slots, counted since earlier tests) may happen.
    assert all(status == 0 for status in node.supervisor.exit_codes[exits:])
    after = uuid.uuid4().hex
    node.send("effect", after, "still serving")
    await wait_until(lambda: _has(node, after, 1), within=60)
