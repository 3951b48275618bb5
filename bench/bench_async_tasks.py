"""Tasks for bench/async_worker.py: one LLM call and one PostgreSQL row per record.

    bench.aura_job     @resilient_task(inbox=...) async def: the client with its breaker
                       and deadline, the inbox read before it runs, the claim and the row
                       in one transaction (``@transactional`` on a Core connection), the
                       DLQ and retries armed (every guarantee)
    bench.plain_job    a plain Celery task for the threads pool: sync httpx to the same
                       simulator, a psycopg insert; no inbox, no breaker, no retries

Both write ``bench_results(message_id, run)``; a round is done when its rows are there.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from aura.config import get_settings
from aura.db import Database, DatabaseInbox, claim_message, transactional
from aura.llm import ResilientLLMClient
from aura.logs import configure_logging
from aura.messaging import delivery_fingerprint, resilient_task
from aura.worker.celery_app import celery_app

app = celery_app
configure_logging("WARNING")
RESULTS_TABLE = (
    "CREATE TABLE IF NOT EXISTS bench_results "
    "(id BIGSERIAL PRIMARY KEY, message_id TEXT NOT NULL, run TEXT NOT NULL)"
)
_resources: dict[int, tuple[Database, ResilientLLMClient]] = {}
_INSERT = text("INSERT INTO bench_results (message_id, run) VALUES (:m, :r)")


def _aura() -> tuple[Database, ResilientLLMClient]:
    if os.getpid() not in _resources:
        settings = get_settings()
        _resources[os.getpid()] = (
            Database.from_settings(settings),
            ResilientLLMClient(settings=settings),
        )
    return _resources[os.getpid()]


@transactional
async def _store(connection: AsyncConnection, message_id: str, fingerprint: str, run: str) -> None:
    if await claim_message(connection, message_id, task="bench.aura_job", fingerprint=fingerprint):
        await connection.execute(_INSERT, {"m": message_id, "r": run})


@resilient_task(name="bench.aura_job", inbox=DatabaseInbox(lambda: _aura()[0]))
async def aura_job(self: Any, run: str, index: int) -> None:
    database, llm = _aura()
    await llm.complete([{"role": "user", "content": f"describe item {index}"}])
    async with database.engine.connect() as connection:
        await _store(connection, self.request.id, delivery_fingerprint(self), run)


_local = threading.local()
_pool_lock = threading.Lock()
_pool: queue.Queue[Any] | None = None
_POOL_SIZE = 20


def _sync_pool() -> queue.Queue[Any]:
    """20 psycopg connections shared by the pool's threads (a thread waits for one)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            import psycopg

            _pool = queue.Queue()
            for _ in range(_POOL_SIZE):
                _pool.put(psycopg.connect(os.environ["BENCH_PG_DSN"], autocommit=True))
    return _pool


def _http() -> httpx.Client:
    if not hasattr(_local, "client"):
        _local.client = httpx.Client(base_url=os.environ["LLM_BASE_URL"], timeout=30.0)
    client: httpx.Client = _local.client
    return client


@app.task(name="bench.plain_job", bind=True)
def plain_job(self: Any, run: str, index: int) -> None:
    answer = _http().post(
        "/chat/completions",
        json={"model": "sim", "messages": [{"role": "user", "content": f"item {index}"}]},
    )
    answer.raise_for_status()
    pool = _sync_pool()
    connection = pool.get()
    try:
        connection.execute(
            "INSERT INTO bench_results (message_id, run) VALUES (%s, %s)", (self.request.id, run)
        )
    finally:
        pool.put(connection)
