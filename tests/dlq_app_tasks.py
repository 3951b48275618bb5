"""A user's own Celery app for test_dlq_store.py (its own queue, not the platform's), run
by a real worker process (loaded with -A).

``summarise`` is a poison pill while the file ``DLQ_TEST_BROKEN`` names exists (the bug),
and commits one row to ``aura_tests.summaries`` with its inbox claim once it is gone (the
fix): a row count per message id other than one is a lost or doubled effect.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from aura.db import Database, DatabaseInbox, claim_message, transactional
from aura.logs import configure_logging
from aura.messaging import configure, delivery_fingerprint, resilient_task

QUEUE = "reviews_summaries"
TASK = "reviews.summarise"
app = configure(Celery("reviews"), queues=[QUEUE])
configure_logging("WARNING", cache=False)
SUMMARIES_TABLE = (
    "CREATE SCHEMA IF NOT EXISTS aura_tests",
    "CREATE TABLE IF NOT EXISTS aura_tests.summaries ("
    " id BIGSERIAL PRIMARY KEY, message_id TEXT NOT NULL, tenant_id TEXT NOT NULL)",
)
_databases: dict[int, Database] = {}


def database() -> Database:
    if os.getpid() not in _databases:
        _databases[os.getpid()] = Database(os.environ["DATABASE_URL"], pool_size=4)
    return _databases[os.getpid()]


@transactional
async def _commit(session: AsyncSession, message_id: str, fingerprint: str, tenant: str) -> None:
    if not await claim_message(session, message_id, task=TASK, fingerprint=fingerprint):
        return
    await session.execute(
        text("INSERT INTO aura_tests.summaries (message_id, tenant_id) VALUES (:m, :t)"),
        {"m": message_id, "t": tenant},
    )


def _broken() -> bool:
    return Path(os.environ["DLQ_TEST_BROKEN"]).exists()


@resilient_task(name=TASK, queue=QUEUE, inbox=DatabaseInbox(database))
async def summarise(self: Any, review: str, tenant_id: str) -> None:
    if _broken():
        raise KeyError("summary_field")  # a bug in our code: a poison pill
    async with database().session() as session:
        await _commit(session, self.request.id, delivery_fingerprint(self), tenant_id)
