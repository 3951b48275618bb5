"""``aura breaker`` and ``aura retries`` against real Redis, as a user runs them."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from aura.llm.breaker import CircuitBreaker
from aura.messaging._retry import RetryTracker
from aura.messaging._task import DEFER_PREFIX
from tests.cli.test_cli import run_aura


@pytest.fixture
async def shared(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_breaker_status_shows_an_open_breaker_and_reset_closes_it_fleet_wide(
    shared: aioredis.Redis, redis_url: str
) -> None:
    name = f"cli-{uuid.uuid4().hex[:8]}"
    breaker = CircuitBreaker(name, fail_max=2, reset_timeout=600, redis=shared)
    started = time.monotonic()

    async def failing() -> None:
        raise ConnectionError("provider down")

    for _ in range(2):
        with pytest.raises(ConnectionError):
            await breaker.call(failing)
    env = {"REDIS_URL": redis_url}

    status = run_aura("breaker", "status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    (shown,) = [row for row in json.loads(status.stdout) if row["name"] == name]
    assert shown["state"] == "open"
    assert shown["consecutive_failures"] == 2
    assert 600 - (time.monotonic() - started) - 1 <= shown["trial_in_s"] <= 600

    reset = run_aura("breaker", "reset", name, env=env)
    assert reset.returncode == 0, reset.stderr
    after = json.loads(run_aura("breaker", "status", "--json", env=env).stdout)
    assert [row["state"] for row in after if row["name"] == name] == ["closed"]
    table = run_aura("breaker", "status", env=env)
    assert name in table.stdout

    unknown = run_aura("breaker", "reset", "no-such-breaker", env=env)
    assert unknown.returncode == 2  # bad input: exit 2, one line
    assert "no breaker named 'no-such-breaker'" in unknown.stderr


async def test_retries_ls_show_reset(shared: aioredis.Redis, redis_url: str) -> None:
    run = uuid.uuid4().hex[:8]
    tracker = RetryTracker(shared, max_retries=3, ttl=3600)
    deferrals = RetryTracker(shared, max_retries=30, ttl=3600, prefix=DEFER_PREFIX)
    ids = [f"{run}-{i}" for i in range(3)]
    started = time.monotonic()
    for count, message_id in enumerate(ids, start=1):
        for _ in range(count):
            await tracker.increment_and_check(message_id)
    await deferrals.increment_and_check(ids[0])
    env = {"REDIS_URL": redis_url}

    listed = run_aura("retries", "ls", "--json", "--limit", "1000", env=env)
    assert listed.returncode == 0, listed.stderr
    counts = {row["message_id"]: row["count"] for row in json.loads(listed.stdout)}
    assert {k: v for k, v in counts.items() if k.startswith(run)} == {
        ids[0]: 1,
        ids[1]: 2,
        ids[2]: 3,
    }
    deferred = json.loads(run_aura("retries", "ls", "--kind", "defer", "--json", env=env).stdout)
    assert [row["message_id"] for row in deferred if row["message_id"].startswith(run)] == [ids[0]]
    bounded = run_aura("retries", "ls", "--limit", "2", env=env)
    assert "more may exist" in bounded.stdout

    shown = json.loads(run_aura("retries", "show", ids[0], env=env).stdout)
    assert shown["retry"]["count"] == 1
    assert shown["defer"]["count"] == 1
    # The TTL the tracker set, less the seconds since (CLI runs take > 10 s on a loaded box).
    assert 3600 - (time.monotonic() - started) - 1 <= shown["retry"]["ttl_s"] <= 3600

    reset = run_aura("retries", "reset", ids[0], env=env)
    assert reset.returncode == 0
    assert "2 count(s) removed" in reset.stdout
    assert await tracker.get(ids[0]) == 0
    assert await deferrals.get(ids[0]) == 0
    assert await tracker.get(ids[1]) == 2  # the others are untouched


def test_bad_input_and_missing_redis_are_one_line() -> None:
    no_redis = run_aura("retries", "ls")
    assert no_redis.returncode == 2
    assert no_redis.stderr.strip() == "aura: REDIS_URL must be set: the shared state lives in Redis"
    env = {"REDIS_URL": "redis://127.0.0.1:1/0"}
    unreachable = run_aura("breaker", "status", env=env)
    assert unreachable.returncode == 2
    assert unreachable.stderr.startswith("aura: cannot use Redis at redis://127.0.0.1:1/0: ")
    bad_kind = run_aura("retries", "ls", "--kind", "maybe", env=env)
    assert bad_kind.returncode == 2
    assert "--kind must be retry or defer" in bad_kind.stderr
    bad_id = run_aura("retries", "show", "retry_count:*", env=env)
    assert bad_id.returncode == 2
    assert "message id" in bad_id.stderr
