"""ResilientLLMClient against the simulator on loopback: timeouts, statuses, the breaker."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from aura.config import Settings
from aura.errors import (
    CircuitOpenError,
    LLMConnectionError,
    LLMHTTPStatusError,
    LLMMalformedResponseError,
    LLMTimeoutError,
)
from aura.events import CircuitState
from aura.llm import Faults, LLMSimulator, ResilientLLMClient
from tests.helpers import FakeClock, metric

MESSAGES = [
    {"role": "system", "content": "Describe the product as JSON."},
    {"role": "user", "content": json.dumps({"title": "Trail shoe", "brand": "Acme"})},
]
pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def simulator() -> AsyncIterator[LLMSimulator]:
    async with LLMSimulator(Faults(api_key="sk-test-key")) as sim:
        yield sim


def client_for(sim: LLMSimulator, **overrides: Any) -> ResilientLLMClient:
    options: dict[str, Any] = {
        "base_url": sim.base_url,
        "api_key": "sk-test-key",
        "clock": FakeClock(),
        "timeout": httpx.Timeout(connect=1.0, read=0.5, write=1.0, pool=1.0),
    }
    return ResilientLLMClient.from_settings(**(options | overrides))


async def test_a_completion_returns_the_assistants_text(simulator: LLMSimulator) -> None:
    before = metric("llm_api_request_duration_seconds_count", outcome="success")
    async with client_for(simulator) as client:
        result = await client.complete(MESSAGES, temperature=0)
    answer = json.loads(result.text)
    assert answer["description"].startswith("Trail shoe by Acme")
    assert "trail" in answer["tags"]
    assert result.usage.total_tokens > 0
    assert result.latency_s > 0
    assert result.model == "gpt-4o-mini"
    assert metric("llm_api_request_duration_seconds_count", outcome="success") == before + 1


async def test_answers_are_deterministic(simulator: LLMSimulator) -> None:
    async with client_for(simulator) as client:
        first = await client.complete(MESSAGES)
        second = await client.complete(MESSAGES)
    assert first.text == second.text


def test_defaults_come_from_settings() -> None:
    client = ResilientLLMClient.from_settings(settings=Settings())
    timeout = client.http_client.timeout
    assert (timeout.connect, timeout.read, timeout.write, timeout.pool) == (5.0, 10.0, 5.0, 5.0)
    assert client.circuit_breaker.fail_max == 3
    assert client.circuit_breaker.reset_timeout == 60
    assert client.deadline == 30
    assert client.base_url == "http://127.0.0.1:8765/v1"
    assert not client.circuit_breaker.shared  # no REDIS_URL: a local breaker


async def test_three_failures_open_the_breaker_and_the_fourth_fails_fast(
    simulator: LLMSimulator,
) -> None:
    simulator.faults.update({"error_rate": 1.0, "error_statuses": [500]})
    clock = FakeClock()
    async with client_for(simulator, clock=clock) as client:
        for _ in range(3):
            with pytest.raises(LLMHTTPStatusError) as failed:
                await client.complete(MESSAGES)
            assert failed.value.status_code == 500
        assert client.circuit_breaker.state is CircuitState.OPEN
        received = simulator.requests
        with pytest.raises(CircuitOpenError) as rejected:
            await client.complete(MESSAGES)
        assert simulator.requests == received  # nothing reached the provider
        assert rejected.value.retry_after == pytest.approx(60.0)

        simulator.faults.update({"error_rate": 0.0})
        clock.advance(60)  # the reset timeout, on the fake clock
        await client.complete(MESSAGES)  # the trial call goes through and closes it
        assert simulator.requests == received + 1
        assert client.circuit_breaker.state is CircuitState.CLOSED


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_request_problems_raise_without_tripping(
    simulator: LLMSimulator, status: int
) -> None:
    simulator.faults.update({"error_rate": 1.0, "error_statuses": [status]})
    async with client_for(simulator) as client:
        for _ in range(4):
            with pytest.raises(LLMHTTPStatusError) as failed:
                await client.complete(MESSAGES)
            assert failed.value.status_code == status
            assert not failed.value.transient
        assert client.circuit_breaker.state is CircuitState.CLOSED


async def test_a_wrong_api_key_is_a_401_that_does_not_trip(simulator: LLMSimulator) -> None:
    async with client_for(simulator, api_key="sk-wrong-secret-123") as client:
        for _ in range(4):
            with pytest.raises(LLMHTTPStatusError) as failed:
                await client.complete(MESSAGES)
            assert failed.value.status_code == 401
            assert "sk-wrong-secret-123" not in str(failed.value)
        assert client.circuit_breaker.state is CircuitState.CLOSED


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
async def test_server_trouble_trips(simulator: LLMSimulator, status: int) -> None:
    simulator.faults.update({"error_rate": 1.0, "error_statuses": [status], "retry_after": 7})
    async with client_for(simulator) as client:
        for _ in range(3):
            with pytest.raises(LLMHTTPStatusError) as failed:
                await client.complete(MESSAGES)
            assert failed.value.transient
            if status in (429, 503):
                assert failed.value.retry_after == 7.0  # Retry-After reaches the caller
        assert client.circuit_breaker.state is CircuitState.OPEN


async def test_a_hanging_server_times_out_and_trips(simulator: LLMSimulator) -> None:
    simulator.faults.update({"hang_rate": 1.0, "hang_seconds": 5})
    before = metric("llm_api_request_duration_seconds_count", outcome="timeout")
    async with client_for(simulator) as client:
        for _ in range(3):
            with pytest.raises(LLMTimeoutError, match="ReadTimeout"):
                await client.complete(MESSAGES)
        assert client.circuit_breaker.state is CircuitState.OPEN
    assert metric("llm_api_request_duration_seconds_count", outcome="timeout") == before + 3


async def test_a_trickling_server_is_cut_at_the_overall_deadline(
    simulator: LLMSimulator,
) -> None:
    # One byte every 0.2 s never trips the 0.5 s read timeout; only the deadline stops it.
    simulator.faults.update({"trickle_rate": 1.0, "trickle_interval": 0.2})
    async with client_for(simulator, deadline=1.0) as client:
        with pytest.raises(LLMTimeoutError, match="within the 1s deadline"):
            await client.complete(MESSAGES)
    assert simulator.outcomes() == {"trickle": 1}


async def test_connection_resets_and_malformed_answers_trip(simulator: LLMSimulator) -> None:
    async with client_for(simulator) as client:
        simulator.faults.update({"reset_rate": 1.0})
        with pytest.raises(LLMConnectionError):
            await client.complete(MESSAGES)
        simulator.faults.update({"reset_rate": 0.0, "malformed_rate": 1.0})
        for _ in range(2):
            with pytest.raises(LLMMalformedResponseError):
                await client.complete(MESSAGES)
        assert client.circuit_breaker.state is CircuitState.OPEN


async def test_an_unreachable_provider_is_a_connection_error() -> None:
    async with ResilientLLMClient.from_settings(
        base_url="http://127.0.0.1:1/v1", clock=FakeClock()
    ) as client:
        with pytest.raises(LLMConnectionError):
            await client.complete(MESSAGES)


async def test_an_outage_is_visible_in_the_simulators_counts(simulator: LLMSimulator) -> None:
    simulator.start_outage(30)
    async with client_for(simulator) as client:
        for _ in range(3):
            with pytest.raises(LLMHTTPStatusError):
                await client.complete(MESSAGES)
        for _ in range(5):
            with pytest.raises(CircuitOpenError):
                await client.complete(MESSAGES)
    assert simulator.outcomes() == {"outage": 3}  # the breaker stopped the other 5


async def test_the_admin_endpoint_changes_faults_while_running(simulator: LLMSimulator) -> None:
    async with httpx.AsyncClient(base_url=simulator.base_url.removesuffix("/v1")) as admin:
        changed = await admin.post("/admin/faults", json={"error_rate": 1.0})
        assert changed.status_code == 200
        assert simulator.faults.error_rate == 1.0
        refused = await admin.post("/admin/faults", json={"error_rate": 3})
        assert refused.status_code == 400
        assert "between 0 and 1" in refused.json()["error"]["message"]
        unknown = await admin.post("/admin/faults", json={"explode": True})
        assert "unknown fault settings: explode" in unknown.json()["error"]["message"]
        stats = await admin.get("/admin/stats")
        assert stats.json() == {"requests": 0, "by_outcome": {}}
