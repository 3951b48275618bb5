"""``aura breaker status`` lists one breaker per provider and model, as the fleet shares them."""

from __future__ import annotations

import json
import uuid

import pytest
import redis.asyncio as aioredis

from aura.config import Settings
from aura.llm import Faults, LLMSimulator, ResilientLLMClient
from tests.cli.test_cli import run_aura
from tests.llm_peer import one

pytestmark = pytest.mark.timeout(60)


async def test_breaker_status_lists_each_model_of_each_provider(redis_url: str) -> None:
    redis = aioredis.from_url(redis_url)
    prefix = f"cli-{uuid.uuid4().hex[:8]}"
    failing = {"sick-model": Faults(error_rate=1.0, error_statuses=(502,))}
    async with (
        LLMSimulator(model_faults=failing) as sim,
        ResilientLLMClient.from_settings(
            settings=Settings(), base_url=sim.base_url, redis=redis, breaker_name=prefix
        ) as client,
    ):
        for _ in range(3):
            assert await one(client, model="sick-model") == "sick-model:LLMHTTPStatusError"
        assert await one(client, model="sick-model") == "sick-model:circuit_open"
        assert await one(client, model="gpt-4o") == "gpt-4o:ok"
        # one failure on the default model: listed closed, one in a row
        sim.faults.update({"error_rate": 1.0, "error_statuses": [500]})
        assert await one(client) == "LLMHTTPStatusError"
    await redis.aclose()
    provider = sim.base_url.split("/")[2]

    status = run_aura("breaker", "status", "--json", env={"REDIS_URL": redis_url})
    assert status.returncode == 0, status.stderr
    rows = {row["name"]: row for row in json.loads(status.stdout) if row["name"].startswith(prefix)}
    sick, default = (
        rows[f"{prefix}:{provider}/sick-model"],
        rows[f"{prefix}:{provider}/gpt-4o-mini"],
    )
    assert (sick["provider"], sick["model"], sick["state"]) == (provider, "sick-model", "open")
    assert sick["consecutive_failures"] == 3
    assert (default["state"], default["consecutive_failures"]) == ("closed", 1)
    assert default["run_started_s_ago"] is not None
    # never failed, so no state of its own: listed all the same (the registry), closed
    healthy = rows[f"{prefix}:{provider}/gpt-4o"]
    assert (healthy["state"], healthy["consecutive_failures"]) == ("closed", 0)

    table = run_aura("breaker", "status", env={"REDIS_URL": redis_url})
    assert "sick-model" in table.stdout
    assert "one per provider and model" in table.stdout
