"""A Celery app of the test's own for tests/messaging/test_worker_broker_blocked.py (loaded with
-A): its own queue ``blocked_jobs`` on a private RabbitMQ node. ``job`` sleeps (so it is in
flight when the test raises the node's memory alarm), fails once (its retry must be
published while the broker blocks publishers), then records itself done in Redis."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from celery import Celery
from redis.asyncio import Redis

from aura.logs import configure_logging
from aura.messaging import configure, resilient_task

QUEUE = "blocked_jobs"
app = Celery("blocked_shop")
configure(app, queues=[QUEUE], make_default=False)  # not the default of other tests
configure_logging("WARNING", cache=False)


@resilient_task(app=app, name="tests.blocked_tasks.job", queue=QUEUE)
async def job(self: Any, run: str, seconds: float) -> None:
    client = Redis.from_url(os.environ["REDIS_URL"])
    try:
        await client.sadd(f"{run}:started", self.request.id)
        if not self.request.retries:
            await asyncio.sleep(seconds)
            raise ConnectionError("transient: its retry is published under the alarm")
        await client.sadd(f"{run}:done", self.request.id)
        await client.incr(f"{run}:runs:{self.request.id}")
    finally:
        await client.aclose()
