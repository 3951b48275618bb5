"""Tasks for test_delivery.py, run by a real Celery worker process (loaded with -A).

``effect`` commits one row to ``aura_tests.delivery_effects`` with its inbox claim, in one
transaction: a row per message id that is not exactly one is a lost or doubled effect.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from aura.catalog import parse_record
from aura.db import Database, DatabaseInbox, claim_message, transactional
from aura.logs import configure_logging
from aura.messaging import delivery_fingerprint, resilient_task
from aura.worker.celery_app import celery_app

app = celery_app
configure_logging("WARNING", cache=False)  # pytest imports it too
FAST = {"backoff_base": 1.0, "backoff_max": 2.0}  # whole seconds: the broker delays retries
EFFECTS_TABLE = (  # in a schema of its own: not part of the models' migrations
    "CREATE SCHEMA IF NOT EXISTS aura_tests",
    "CREATE TABLE IF NOT EXISTS aura_tests.delivery_effects ("
    " id BIGSERIAL PRIMARY KEY, message_id TEXT NOT NULL, run TEXT NOT NULL, note TEXT)",
)
_databases: dict[int, Database] = {}


def database() -> Database:
    if os.getpid() not in _databases:
        _databases[os.getpid()] = Database(
            os.environ["DATABASE_URL"], pool_size=10, max_overflow=10
        )
    return _databases[os.getpid()]


@transactional
async def _commit(
    session: AsyncSession, message_id: str, fingerprint: str, run: str, note: str
) -> None:
    if not await claim_message(
        session, message_id, task="tests.delivery_tasks.effect", fingerprint=fingerprint
    ):
        return
    await session.execute(
        text("INSERT INTO aura_tests.delivery_effects (message_id, run, note) VALUES (:m, :r, :n)"),
        {"m": message_id, "r": run, "n": note},
    )


@resilient_task(inbox=DatabaseInbox(database), **FAST)
async def effect(self: Any, run: str, note: str, fail_times: int = 0, seconds: float = 0.0) -> None:
    """Sleep ``seconds``, fail transiently on the first ``fail_times`` tries, then commit."""
    if seconds:
        await asyncio.sleep(seconds)
    if self.request.retries < fail_times:
        raise ConnectionError(f"transient failure on try {self.request.retries + 1}")
    async with database().session() as session:
        await _commit(session, self.request.id, delivery_fingerprint(self), run, note)


@resilient_task(queue="bulk_queue", **FAST)
async def parse(self: Any, raw: str, run: str) -> None:
    """A catalog record that must parse (the platform's first step); nothing else."""
    parse_record(raw)


def _redis() -> Any:
    import redis.asyncio as aioredis

    key = ("redis", os.getpid())
    if key not in _clients:
        _clients[key] = aioredis.from_url(os.environ["REDIS_URL"])
    return _clients[key]


_clients: dict[Any, Any] = {}


@resilient_task(inbox=DatabaseInbox(database), **FAST)
async def barrier(self: Any, run: str, parties: int) -> None:
    """Commit only once ``parties`` tasks of ``run`` are in flight at the same time: in a
    worker that runs fewer at once, none ever commits (each gives up after 60 s)."""
    redis = _redis()
    await redis.incr(f"{run}:arrived")
    for _ in range(1200):
        if int(await redis.get(f"{run}:arrived") or 0) >= parties:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"fewer than {parties} tasks in flight at once")
    async with database().session() as session:
        await _commit(session, self.request.id, delivery_fingerprint(self), run, "barrier")


@resilient_task(**FAST)
async def sleepy(self: Any, run: str, seconds: float) -> None:
    """Sleeps past the soft limit; its cleanup must run when it is cancelled."""
    redis = _redis()
    await redis.incr(f"{run}:attempts")
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        await redis.incr(f"{run}:cleaned")
        raise


@resilient_task(**FAST)
async def stubborn(self: Any, run: str, seconds: float) -> None:
    """Swallows every cancellation: only the hard limit ends it."""
    redis = _redis()
    await redis.incr(f"{run}:attempts")
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            await redis.incr(f"{run}:ignored")
