"""``aura breaker status`` lists every breaker the fleet uses, failed or not."""

from __future__ import annotations

import json
import uuid

import pytest
import redis.asyncio as aioredis

from aura.config import Settings
from aura.errors import LLMError
from aura.llm import Faults, LLMSimulator, ResilientLLMClient
from tests.cli.test_cli import run_aura

MESSAGES = [{"role": "user", "content": "status"}]


async def test_status_lists_every_breaker_used_failed_or_not(
    redis: aioredis.Redis, redis_url: str
) -> None:
    healthy, failing = (f"m-{uuid.uuid4().hex[:6]}" for _ in range(2))
    down = {failing: Faults(error_rate=1.0, error_statuses=(503,), retry_after=None)}
    async with (
        LLMSimulator(model_faults=down) as sim,
        ResilientLLMClient.from_settings(
            settings=Settings(), base_url=sim.base_url, redis=redis, fail_max=2
        ) as client,
    ):
        await client.complete(MESSAGES, model=healthy)
        for _ in range(2):
            with pytest.raises(LLMError):
                await client.complete(MESSAGES, model=failing)
        names = {model: client.breaker_name_for(model) for model in (healthy, failing)}
    env = {"REDIS_URL": redis_url}

    status = run_aura("breaker", "status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    rows = {row["model"]: row for row in json.loads(status.stdout)}
    assert rows[healthy]["name"] == names[healthy]  # never failed: no state, still listed
    assert (rows[healthy]["state"], rows[healthy]["consecutive_failures"]) == ("closed", 0)
    assert rows[failing]["state"] == "open"
    assert rows[failing]["provider"] == rows[healthy]["provider"] != None  # noqa: E711
    table = run_aura("breaker", "status", env=env)
    assert names[healthy] in table.stdout
    assert names[failing] in table.stdout
    # a breaker that never failed can be reset by name too (nothing to do, no error)
    assert run_aura("breaker", "reset", names[healthy], env=env).returncode == 0
