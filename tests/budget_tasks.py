"""A Celery app of the test's own for tests/llm/test_budgets_fleet.py (loaded with -A): its
own queue ``budget_jobs`` and one task that asks the LLM for a tenant and records, in
Redis, when it was done. The windows are the test's (BUDGET_TEST_MINUTE_S): the same
budgets code, a shorter minute, so the fleet test runs in seconds.

The task sends the tenant as OpenAI's ``user`` field, so the simulator counts each
tenant's tokens where they are spent.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery
from redis.asyncio import Redis

from aura.config import get_settings
from aura.llm import ResilientLLMClient, TenantBudgets
from aura.logs import configure_logging
from aura.messaging import configure, resilient_task

QUEUE = "budget_jobs"
TASK = "tests.budget_tasks.describe"
MAX_TOKENS = 40
app = Celery("budget_shop")
configure(app, queues=[QUEUE], make_default=False)  # not the default of other tests
configure_logging("WARNING", cache=False)
_clients: dict[int, tuple[ResilientLLMClient, Redis]] = {}


def _client() -> tuple[ResilientLLMClient, Redis]:
    """This process's LLM client (budgets on the test's windows) and Redis (made on its
    event loop, kept)."""
    if os.getpid() not in _clients:
        settings = get_settings()
        redis = Redis.from_url(os.environ["REDIS_URL"])
        budgets = TenantBudgets.from_settings(
            settings, redis=redis, minute_s=float(os.environ["BUDGET_TEST_MINUTE_S"])
        )
        client = ResilientLLMClient.from_settings(settings, redis=redis, budgets=budgets)
        _clients[os.getpid()] = (client, redis)
    return _clients[os.getpid()]


def prompt(tenant_id: str, n: int) -> list[dict[str, str]]:
    facts = {"title": f"Trail shoe {n}", "brand": "Aura", "category": "shoes"}
    return [{"role": "user", "content": json.dumps(facts) + f" #{tenant_id[:8]}"}]


@resilient_task(app=app, name=TASK, queue=QUEUE)
async def describe(self: Any, tenant_id: str, run: str, n: int, sent_at: float) -> None:
    client, redis = _client()
    await redis.incr(f"{run}:runs:{tenant_id}")  # every run: the deferred ones run again
    await client.complete(
        prompt(tenant_id, n), tenant=tenant_id, user=tenant_id, max_tokens=MAX_TOKENS
    )
    # when it was done, and how long after it was sent (wall clock: the test's measure)
    await redis.rpush(f"{run}:done:{tenant_id}", repr(time.time() - sent_at))
