"""Two processes sharing one breaker through real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

import pytest
import redis.asyncio as aioredis

from aura.config import Settings
from aura.events import CircuitState
from aura.llm import BreakerRecord, Faults, LLMSimulator, ResilientLLMClient
from tests.helpers import FakeClock, metric, wait_until
from tests.llm.support import Peer
from tests.llm_peer import one

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def shared(redis: aioredis.Redis) -> tuple[aioredis.Redis, str]:
    return redis, f"fleet-{uuid.uuid4().hex[:8]}"


async def test_an_open_in_one_process_fails_the_other_fast_within_a_second(
    redis_url: str, shared: tuple[aioredis.Redis, str]
) -> None:
    redis, breaker = shared
    clock = FakeClock(time.time() + 30)  # this process's calls come after the peer's
    async with (
        LLMSimulator() as sim,
        ResilientLLMClient.from_settings(
            settings=Settings(),
            base_url=sim.base_url,
            redis=redis,
            clock=clock,
            breaker_name=breaker,
        ) as client,
    ):
        assert await one(client) == "ok"  # this process now caches "closed"
        sim.faults.update({"error_rate": 1.0, "error_statuses": [503]})
        opens_here = metric("llm_circuit_breaker_opens_total")

        peer = await Peer.start("fail", sim.base_url, redis_url, breaker, "3")
        result = await peer.result()
        assert result["outcomes"] == {"LLMHTTPStatusError": 3}
        assert result["opens"] == 1  # the process that opened it counted the transition

        received = sim.requests
        clock.advance(1.0)  # within one refresh interval this process sees it open
        assert await one(client) == "circuit_open"
        assert sim.requests == received  # failed fast, nothing sent
        assert client.circuit_breaker.state is CircuitState.OPEN
        assert metric("llm_circuit_breaker_opens_total") == opens_here  # counted once, there


async def test_half_open_runs_exactly_one_trial_across_both_processes(
    redis_url: str, shared: tuple[aioredis.Redis, str]
) -> None:
    redis, breaker = shared
    go_key = f"{breaker}:go"
    reset = {"CIRCUIT_BREAKER_RESET_TIMEOUT": "0.5", "LLM_TRIAL_WAIT": "0"}  # refused: counted
    async with (
        LLMSimulator(Faults(error_rate=1.0, error_statuses=(500,))) as sim,
        ResilientLLMClient.from_settings(
            settings=Settings(circuit_breaker_reset_timeout=0.5, llm_trial_wait=0),
            base_url=sim.base_url,
            redis=redis,
            breaker_name=breaker,
        ) as client,
    ):
        for _ in range(3):
            assert await one(client) == "LLMHTTPStatusError"
        assert client.circuit_breaker.state is CircuitState.OPEN
        # The provider recovers, slowly: the trial call is in flight for 1.5 s.
        sim.faults.update({"error_rate": 0.0, "latency": 1.5})
        peer = await Peer.start("burst", sim.base_url, redis_url, breaker, "5", go_key, env=reset)
        record = BreakerRecord.from_redis(await redis.hgetall(client.circuit_breaker.key))

        async def reset_timeout_passed() -> bool:
            return time.time() >= record.open_until

        await wait_until(reset_timeout_passed, within=5)
        received = sim.requests
        await redis.set(go_key, 1)
        here = Counter(await asyncio.gather(*(one(client) for _ in range(5))))
        there = Counter((await peer.result())["outcomes"])

    assert sim.requests == received + 1  # exactly one trial call reached the provider
    assert here + there == Counter({"ok": 1, "circuit_open": 9})


async def test_exactly_one_half_open_trial_per_model_across_both_processes(
    redis_url: str, shared: tuple[aioredis.Redis, str]
) -> None:
    redis, breaker = shared
    go_key = f"{breaker}:go"
    models = ("model-a", "model-b")
    failing = {m: Faults(error_rate=1.0, error_statuses=(500,)) for m in models}
    reset = {
        "CIRCUIT_BREAKER_RESET_TIMEOUT": "0.5",
        "LLM_TRIAL_WAIT": "0",
        "PEER_MODELS": ",".join(models),
    }
    async with (
        LLMSimulator(model_faults=failing) as sim,
        ResilientLLMClient.from_settings(
            settings=Settings(circuit_breaker_reset_timeout=0.5, llm_trial_wait=0),
            base_url=sim.base_url,
            redis=redis,
            breaker_name=breaker,
        ) as client,
    ):
        for model in models:
            for _ in range(3):
                assert await one(client, model=model) == f"{model}:LLMHTTPStatusError"
            assert client.breaker_for(model).state is CircuitState.OPEN
            sim.model_faults[model].update({"error_rate": 0.0, "latency": 1.5})  # slow trial
        peer = await Peer.start("burst", sim.base_url, redis_url, breaker, "5", go_key, env=reset)
        keys = [client.breaker_for(model).key for model in models]
        records = [BreakerRecord.from_redis(await redis.hgetall(key)) for key in keys]

        async def reset_timeouts_passed() -> bool:
            return time.time() >= max(record.open_until for record in records)

        await wait_until(reset_timeouts_passed, within=5)
        received = sim.requests
        await redis.set(go_key, 1)
        here = Counter(
            await asyncio.gather(*(one(client, model=m) for m in models for _ in range(5)))
        )
        there = Counter((await peer.result())["outcomes"])

    assert sim.requests == received + 2  # one trial per model reached the provider
    assert here + there == Counter(
        {f"{m}:{outcome}": n for m in models for outcome, n in (("ok", 1), ("circuit_open", 9))}
    )


async def test_the_opening_rule_holds_across_processes_as_documented(
    redis_url: str, shared: tuple[aioredis.Redis, str]
) -> None:
    """fail (peer), succeed (here), fail, fail (peer): two in a row, closed -- once this
    process's success is recorded, with its first call a refresh interval later."""
    redis, breaker = shared
    clock = FakeClock(time.time() + 30)  # this process's calls come after the peer's
    async with (
        LLMSimulator() as sim,
        ResilientLLMClient.from_settings(
            settings=Settings(),
            base_url=sim.base_url,
            redis=redis,
            clock=clock,
            breaker_name=breaker,
        ) as client,
    ):
        assert await one(client) == "ok"  # this process caches "closed, no failures"
        sim.faults.update({"error_rate": 1.0, "error_statuses": [503]})
        first = await (await Peer.start("fail", sim.base_url, redis_url, breaker, "1")).result()
        assert first["outcomes"] == {"LLMHTTPStatusError": 1}
        sim.faults.update({"error_rate": 0.0})
        assert await one(client) == "ok"  # no round trip: the hot path records nothing yet
        record = BreakerRecord.from_redis(await redis.hgetall(client.circuit_breaker.key))
        assert record.failures == 1
        clock.advance(1.0)
        assert await one(client) == "ok"  # refresh: the success is recorded
        record = BreakerRecord.from_redis(await redis.hgetall(client.circuit_breaker.key))
        assert record.failures == 0
        sim.faults.update({"error_rate": 1.0})
        second = await (await Peer.start("fail", sim.base_url, redis_url, breaker, "2")).result()
        assert second["outcomes"] == {"LLMHTTPStatusError": 2}
        record = BreakerRecord.from_redis(await redis.hgetall(client.circuit_breaker.key))
        assert (record.state, record.failures) == (CircuitState.CLOSED, 2)
        third = await (await Peer.start("fail", sim.base_url, redis_url, breaker, "1")).result()
        assert third["opens"] == 1
        record = BreakerRecord.from_redis(await redis.hgetall(client.circuit_breaker.key))
        assert record.state is CircuitState.OPEN
