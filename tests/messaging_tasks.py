"""Tasks run by a real Celery worker process in test_worker.py (loaded with -A)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

import redis
import redis.asyncio as aioredis
from billiard.exceptions import SoftTimeLimitExceeded

from aura.logs import configure_logging
from aura.messaging import resilient_task
from aura.worker.celery_app import celery_app

app = celery_app
configure_logging("WARNING", cache=False)  # pytest imports it too
FAST = {"backoff_base": 1.0, "backoff_max": 2.0}  # whole seconds: the broker delays retries
_clients: dict[int, Any] = {}


def _async_redis() -> aioredis.Redis:
    key = os.getpid()
    if key not in _clients:
        _clients[key] = aioredis.from_url(os.environ["REDIS_URL"])
    client: aioredis.Redis = _clients[key]
    return client


def _redis() -> redis.Redis:
    return redis.Redis.from_url(os.environ["REDIS_URL"])


@resilient_task(queue="bulk_queue", **FAST)
async def parse_record(self: Any, raw: str, run: str) -> None:
    record = json.loads(raw)
    await _async_redis().sadd(f"{run}:done", record["sku"])


@resilient_task(**FAST)
async def flaky(self: Any, run: str, failures: int) -> None:
    attempt = await _async_redis().incr(f"{run}:attempts")
    if attempt <= failures:
        raise ConnectionError(f"transient failure {attempt}")
    await _async_redis().sadd(f"{run}:done", self.request.id)


@resilient_task(**FAST)
def always_fails(self: Any, run: str) -> None:
    _redis().incr(f"{run}:attempts")
    raise TimeoutError("the dependency never answers")


@resilient_task(**FAST)
async def slow_async(self: Any, run: str, seconds: float) -> None:
    await _async_redis().incr(f"{run}:attempts")
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        await _async_redis().incr(f"{run}:cleaned")  # cleanup runs on the soft limit
        raise


@resilient_task(**FAST)
def stubborn(self: Any, run: str, seconds: float) -> None:
    _redis().incr(f"{run}:attempts")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(0.05)
        except SoftTimeLimitExceeded:
            _redis().incr(f"{run}:ignored_soft_limit")


@resilient_task(**FAST)
def suicide(self: Any, run: str) -> None:
    _redis().incr(f"{run}:attempts")
    os.kill(os.getpid(), signal.SIGKILL)


@resilient_task(**FAST)
async def needs_fix(self: Any, run: str) -> None:
    if not await _async_redis().exists(f"{run}:fixed"):
        raise ValueError("the record refers to a category that does not exist yet")
    await _async_redis().sadd(f"{run}:done", self.request.id)
