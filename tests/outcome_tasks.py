"""A Celery app of the test's own for tests/messaging/test_celery_conventions.py (loaded with -A):
its own queues ``outcome_jobs`` (consumed) and ``outcome_mail`` (not), and tasks with
every fate. Each ``task_failure`` and
``task_success`` signal the worker sends is recorded in Redis, as a user's handler would."""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery, signals

from aura.messaging import configure, resilient_task

QUEUE = "outcome_jobs"
OTHER_QUEUE = "outcome_mail"  # the app's second queue: no worker of the test consumes it
app = Celery("outcome_shop")
configure(app, queues=[QUEUE, OTHER_QUEUE], make_default=False)
_FAST = {"backoff_base": 1.0, "backoff_max": 1.0}


def _redis() -> redis.Redis:
    return redis.Redis.from_url(os.environ["REDIS_URL"])


@resilient_task(app=app, name="outcome.ok", queue=QUEUE)
async def ok(self: Any, run: str) -> str:
    return "done"


@resilient_task(app=app, name="outcome.poison", queue=QUEUE)
async def poison(self: Any, run: str) -> None:
    raise KeyError("the record has no title")


@resilient_task(app=app, name="outcome.flaky", queue=QUEUE, **_FAST)
async def flaky(self: Any, run: str) -> str:
    if not self.request.retries:
        raise ConnectionError("transient: retried once")
    return "done"


@signals.task_failure.connect
def _failed(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    if getattr(sender, "app", None) is not app:  # the suite imports this module too
        return
    client = _redis()
    try:
        client.sadd("signals:task_failure", str(task_id))
    finally:
        client.close()


@signals.task_success.connect
def _succeeded(sender: Any = None, **_: Any) -> None:
    if getattr(sender, "app", None) is not app:
        return
    client = _redis()
    try:
        client.sadd("signals:task_success", str(sender.request.id))
    finally:
        client.close()
