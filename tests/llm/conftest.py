"""The LLM tests' fixtures: a Redis client of the run's own Redis, and a breaker on an
injected clock, once local and once shared through that Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from aura.llm import CircuitBreaker
from tests.helpers import FakeClock
from tests.llm.support import counts_boom


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(params=["local", "redis"])
async def breaker_and_clock(
    request: pytest.FixtureRequest, redis_url: str
) -> AsyncIterator[tuple[FakeClock, CircuitBreaker]]:
    """A fresh breaker (the seed's policy: 3 failures, 60 s) counting ``Boom``."""
    clock = FakeClock()
    client = aioredis.from_url(redis_url) if request.param == "redis" else None
    name = f"test-{uuid.uuid4().hex[:8]}"
    yield clock, CircuitBreaker(name, redis=client, clock=clock, is_failure=counts_boom)
    if client is not None:
        await client.aclose()
