"""Tasks for bench/task_overhead.py: the same no-op, plain and as a resilient_task."""

from __future__ import annotations

import os
from typing import Any

import redis

from aura.logs import configure_logging
from aura.messaging import resilient_task
from aura.worker.celery_app import celery_app

app = celery_app
configure_logging("WARNING")
_client: dict[int, redis.Redis] = {}


def _count(key: str) -> None:
    if os.getpid() not in _client:
        _client[os.getpid()] = redis.Redis.from_url(os.environ["REDIS_URL"])
    _client[os.getpid()].incr(key)


@celery_app.task(name="bench.plain", bind=True)
def plain(self: Any, key: str) -> None:
    _count(key)


@resilient_task(name="bench.resilient")
def resilient(self: Any, key: str) -> None:
    _count(key)


@resilient_task(name="bench.resilient_async")
async def resilient_async(self: Any, key: str) -> None:
    _count(key)
