"""A Celery app of the test's own for tests/messaging/test_database_exhausted.py (loaded with -A):
its own queue ``outage_orders`` and one inbox task. ``place_order`` reads the inbox (the
resilient task does), counts its "LLM call" in Redis, then commits its row with its inbox
claim in one transaction: a row per message that is not exactly one is a lost or doubled
effect, and a call counted while the database is out is one the gate should have held."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from aura.db import Database, DatabaseInbox, claim_message, transactional
from aura.logs import configure_logging
from aura.messaging import configure, delivery_fingerprint, resilient_task

QUEUE = "outage_orders"
TASK = "tests.outage_tasks.place_order"
app = Celery("outage_shop")
configure(app, queues=[QUEUE], make_default=False)  # not the default of other tests
configure_logging("WARNING", cache=False)
_databases: dict[int, Database] = {}


def database() -> Database:
    if os.getpid() not in _databases:
        _databases[os.getpid()] = Database(os.environ["DATABASE_URL"], pool_size=5, max_overflow=5)
    return _databases[os.getpid()]


@transactional
async def _commit(session: AsyncSession, message_id: str, fingerprint: str, run: str) -> None:
    if not await claim_message(session, message_id, task=TASK, fingerprint=fingerprint):
        return
    await session.execute(
        text("INSERT INTO aura_outage_tests.orders (message_id, run) VALUES (:m, :r)"),
        {"m": message_id, "r": run},
    )


@resilient_task(app=app, name=TASK, queue=QUEUE, inbox=DatabaseInbox(database))
async def place_order(self: Any, run: str) -> None:
    client = Redis.from_url(os.environ["REDIS_URL"])
    try:
        await client.incr(f"{run}:calls")  # stands for the LLM call: after the inbox read
    finally:
        await client.aclose()
    async with database().session() as session:
        await _commit(session, self.request.id, delivery_fingerprint(self), run)
