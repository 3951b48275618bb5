"""The adaptive share of a rate limit (AIMD on 429s and latency), per-model limits, their
settings and metrics. Time is a fake clock: the share's growth is computed from it."""

from __future__ import annotations

import time
import uuid

import pytest
import redis.asyncio as aioredis

from aura.config import Settings, load_settings, parse_rate_limits
from aura.errors import ConfigurationError
from aura.llm import Faults, LLMSimulator, ResilientLLMClient
from aura.llm.client import provider_of
from aura.llm.ratelimit import LLMRateLimitedError, RateLimit, RateLimiter
from tests.helpers import FakeClock, metric
from tests.llm.support import Sleeps
from tests.llm_peer import MESSAGES

pytestmark = pytest.mark.timeout(60)


def fleet(
    redis: aioredis.Redis, limit: RateLimit, processes: int = 2
) -> tuple[list[RateLimiter], FakeClock, Sleeps]:
    """``processes`` limiters of one name on one Redis: the same limit in a fleet."""
    clock = FakeClock()
    sleeps = Sleeps(clock)
    name = f"aimd-{uuid.uuid4().hex[:8]}/model"
    limiters = [
        RateLimiter(name, limit, redis=redis, clock=clock, sleep=sleeps) for _ in range(processes)
    ]
    return limiters, clock, sleeps


async def test_a_429_halves_the_pace_once_per_congestion_event_then_it_grows_back(
    redis: aioredis.Redis,
) -> None:
    (gcra, _), clock, sleeps = fleet(redis, RateLimit(rpm=60, decrease=0.5, recovery_s=60))
    sent_at = clock()
    assert await gcra.acquire(1, max_wait=10) == 0.0
    assert await gcra.acquire(1, max_wait=10) == 1.0  # 60/min: one a second
    assert await gcra.slow_down(sent_at) is True  # the provider said 429
    assert gcra.share == 0.5
    # the other calls already in flight when the limit was hit say nothing new
    assert await gcra.slow_down(sent_at) is False
    assert gcra.share == 0.5
    clock.advance(10)
    assert await gcra.acquire(1, max_wait=10) == 0.0
    assert gcra.share == pytest.approx(0.5 + 10 / 60)  # linear growth, no writes
    assert await gcra.acquire(1, max_wait=10) == pytest.approx(60 / (60 * (0.5 + 10 / 60)))
    sent_later = clock()
    assert await gcra.slow_down(sent_later) is True  # a call sent after the decrease: again
    assert gcra.share == pytest.approx((0.5 + 10 / 60) * 0.5)
    clock.advance(60)
    await gcra.acquire(1, max_wait=10)
    assert gcra.share == 1.0  # back to the whole limit
    assert sleeps.waits[0] == 1.0


async def test_the_fleet_shares_one_share(redis: aioredis.Redis) -> None:
    (one, other), clock, _ = fleet(redis, RateLimit(rpm=600, decrease=0.7, recovery_s=60))
    await one.acquire(1, max_wait=1)
    await other.acquire(1, max_wait=1)
    await one.slow_down(clock())
    clock.advance(0.1)
    await other.acquire(1, max_wait=1)
    assert other.share == pytest.approx(0.7 + 0.1 / 60)
    # other now knows of a decrease newer than its own calls sent before it: no round trip
    assert await other.slow_down(clock() - 1) is False
    assert other.share == pytest.approx(0.7 + 0.1 / 60)


async def test_slow_answers_shrink_the_share_gently_and_never_below_the_floor(
    redis: aioredis.Redis,
) -> None:
    limit = RateLimit(rpm=600, decrease=0.5, recovery_s=60, min_share=0.2)
    (gcra, _), clock, _ = fleet(redis, limit)
    assert await gcra.slow_down(clock(), gently=True) is True
    assert gcra.share == 0.75  # (1 + 0.5) / 2
    clock.advance(1.0)  # within the cooldown (2 s) after a decrease: no second one
    assert await gcra.slow_down(clock()) is False
    for _ in range(10):
        clock.advance(2.5)
        await gcra.slow_down(clock())
    # without the floor: about 0.04 ((share + 2.5 / 60) x 0.5, again and again)
    assert gcra.share == pytest.approx(0.2, abs=0.01)


async def test_not_adaptive_means_the_configured_limit_whatever_the_provider_says(
    redis: aioredis.Redis,
) -> None:
    (gcra, _), clock, _ = fleet(redis, RateLimit(rpm=60, adaptive=False))
    assert await gcra.slow_down(clock()) is False
    await gcra.acquire(1, max_wait=1)
    assert await gcra.acquire(1, max_wait=10) == 1.0
    assert gcra.share == 1.0


def test_limits_refuse_values_that_make_no_sense() -> None:
    with pytest.raises(ValueError, match="decrease"):
        RateLimit(rpm=60, decrease=1.0)
    with pytest.raises(ValueError, match="burst_s"):
        RateLimit(rpm=-1)


async def test_metrics_for_each_decision(redis: aioredis.Redis) -> None:
    (gcra, _), clock, _ = fleet(redis, RateLimit(rpm=60, decrease=0.5))
    name = gcra.name
    assert metric("aura_llm_rate_limit_rpm", limiter=name) == 60
    await gcra.acquire(1, max_wait=10)
    await gcra.acquire(1, max_wait=10)  # waits 1 s
    with pytest.raises(LLMRateLimitedError):
        await gcra.acquire(1, max_wait=0)
    await gcra.slow_down(clock())
    assert metric("aura_llm_rate_limit_total", limiter=name, outcome="admitted") == 2
    assert metric("aura_llm_rate_limit_total", limiter=name, outcome="deferred") == 1
    assert metric("aura_llm_rate_limit_total", limiter=name, outcome="decreased") == 1
    assert metric("aura_llm_rate_limit_wait_seconds_sum", limiter=name) == 1.0
    assert metric("aura_llm_rate_limit_wait_seconds_count", limiter=name) == 2
    assert metric("aura_llm_rate_limit_rpm", limiter=name) == 30


async def test_the_client_slows_the_fleet_on_a_429_and_on_slow_answers(
    redis: aioredis.Redis,
) -> None:
    clock = FakeClock(time.time())
    throttled_model, slow_model = (f"m-{uuid.uuid4().hex[:6]}" for _ in range(2))
    faults = {
        throttled_model: Faults(error_rate=1.0, error_statuses=(429,), retry_after=0.01),
        slow_model: Faults(latency=0.2),
    }
    async with (
        LLMSimulator(model_faults=faults) as sim,
        ResilientLLMClient.from_settings(
            settings=Settings(),
            base_url=sim.base_url,
            redis=redis,
            clock=clock,
            rate_limit=RateLimit(rpm=6000, decrease=0.5, latency_s=0.1),
        ) as client,
    ):
        with pytest.raises(Exception, match="429"):
            await client.complete(MESSAGES, model=throttled_model)
        throttled = client.limiter_for(throttled_model)
        assert throttled.share == 0.5
        assert metric("aura_llm_rate_limit_total", limiter=throttled.name, outcome="throttled") == 1
        assert client.breaker_for(throttled_model)._record.failures == 0  # the limiter's job
        await client.complete(MESSAGES, model=slow_model)
        assert client.limiter_for(slow_model).share == 0.75


async def test_per_model_limits_from_the_settings(redis: aioredis.Redis) -> None:
    clock = FakeClock(time.time())
    sleeps = Sleeps(clock)
    limited, by_provider, free = (f"m-{uuid.uuid4().hex[:6]}" for _ in range(3))
    async with LLMSimulator() as sim:
        provider = provider_of(sim.base_url)
        settings = Settings(
            llm_rate_limit_tpm=100_000,
            llm_rate_limits=f"{limited} rpm=60 burst=1; {provider}/{by_provider} rpm=120 burst=0.5",
        )
        async with ResilientLLMClient.from_settings(
            settings=settings, base_url=sim.base_url, redis=redis, clock=clock, sleep=sleeps
        ) as client:
            assert (client.rate_limit_for(limited).rpm, client.rate_limit_for(limited).tpm) == (
                60,
                100_000,  # the limits an entry leaves out come from the defaults
            )
            assert client.rate_limit_for(by_provider).rpm == 120
            assert client.rate_limit_for(free).rpm == 0
            for model in (limited, limited, by_provider, by_provider, free, free):
                await client.complete(MESSAGES, model=model)
    assert sleeps.waits == [1.0, 0.5]  # 60/min and 120/min; the third only by its tokens


def test_per_model_limits_are_checked_with_one_line_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert parse_rate_limits(" a rpm=1 ; b tpm=2 burst=0.5 ;") == {
        "a": {"rpm": 1.0},
        "b": {"tpm": 2.0, "burst": 0.5},
    }
    for bad, says in [
        ("gpt-4o", "has no limits"),
        ("gpt-4o rpm=fast", "rpm expects a number"),
        ("gpt-4o qps=3", "unknown limit 'qps'"),
        ("gpt-4o rpm=-1", "rpm must be >= 0"),
        ("gpt-4o burst=0", "burst must be > 0"),
        ("a rpm=1; a rpm=2", "appears twice"),
    ]:
        monkeypatch.setenv("LLM_RATE_LIMITS", bad)
        with pytest.raises(ConfigurationError) as raised:
            load_settings()
        message = str(raised.value)
        assert "\n" not in message
        assert "LLM_RATE_LIMITS" in message
        assert says in message
    monkeypatch.setenv("LLM_RATE_LIMITS", "")
    monkeypatch.setenv("LLM_RATE_LIMIT_DECREASE", "1.5")
    with pytest.raises(ConfigurationError, match="LLM_RATE_LIMIT_DECREASE"):
        load_settings()
