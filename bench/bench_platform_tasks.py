"""Tasks for bench/platform_throughput.py: the platform's own, and a plain baseline.

Importing this module registers the platform's ``aura.ingest_product`` and
``aura.enrich_product`` (``aura.worker.tasks``) and ``bench.plain_ingest``: a plain
``@app.task`` on the same app (``make_celery_app``: same broker, same settings) that does
the same product write, ``create_product_with_variants`` on the same database, and
nothing else -- no inbox row, no import record, no enrichment message, no LLM call.
Both run ``async`` database code on one event loop per worker process, made after fork.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from typing import Any

from aura.catalog import create_product_with_variants
from aura.config import get_settings
from aura.db import Database
from aura.logs import configure_logging
from aura.worker import tasks as platform_tasks
from aura.worker.celery_app import celery_app

__all__ = ["app", "plain_ingest", "platform_tasks"]

app = celery_app
configure_logging("WARNING")
_loops: dict[int, asyncio.AbstractEventLoop] = {}
_databases: dict[int, Database] = {}


def _loop() -> asyncio.AbstractEventLoop:
    pid = os.getpid()
    if pid not in _loops:
        _loops[pid] = asyncio.new_event_loop()
    return _loops[pid]


async def _write(raw: str, tenant_id: str) -> str:
    pid = os.getpid()
    if pid not in _databases:  # made on this process's loop, kept, as the platform does
        _databases[pid] = Database.from_settings(get_settings())
    async with _databases[pid].session() as session:
        product = await create_product_with_variants(session, uuid.UUID(tenant_id), json.loads(raw))
    return str(product.id)


@celery_app.task(name="bench.plain_ingest", bind=True)
def plain_ingest(self: Any, raw: str, tenant_id: str) -> str:
    return _loop().run_until_complete(_write(raw, tenant_id))
