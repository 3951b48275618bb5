"""The Anthropic Messages API behind the provider seam: its wire format, then end to end
through ResilientLLMClient against the simulator's ``/v1/messages`` (answers, streams,
errors, the breaker and the fleet's rate limiter)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis

from aura.config import Settings
from aura.errors import (
    CircuitOpenError,
    ConfigurationError,
    LLMConnectionError,
    LLMHTTPStatusError,
    LLMMalformedResponseError,
)
from aura.llm import (
    AnthropicProvider,
    Faults,
    LLMRateLimitedError,
    LLMSimulator,
    OpenAIProvider,
    RateLimit,
    ResilientLLMClient,
)
from tests.helpers import FakeClock

KEY = "sk-ant-test"
PRODUCT = [{"role": "user", "content": json.dumps({"title": "Trail shoe", "brand": "Acme"})}]
PROVIDER = AnthropicProvider("https://api.anthropic.test/v1", KEY)


# -- the wire format -----------------------------------------------------------------------


def test_the_request_moves_system_messages_and_requires_max_tokens() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Answer in JSON."},
        {"role": "user", "content": "hello"},
    ]
    request = PROVIDER.request("claude-x", messages, {"temperature": 0}, stream=False)
    assert request.path == "/messages"
    assert request.body == {
        "model": "claude-x",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": "hello"}],
        "temperature": 0,
        "system": "Be brief.\n\nAnswer in JSON.",
    }
    streamed = PROVIDER.request("claude-x", messages[2:], {"max_tokens": 7}, stream=True)
    assert streamed.body == {
        "model": "claude-x",
        "max_tokens": 7,
        "messages": [{"role": "user", "content": "hello"}],
        "stream": True,
    }
    assert PROVIDER.headers == {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    assert AnthropicProvider("http://x/v1").headers == {"anthropic-version": "2023-06-01"}


def test_an_answer_reads_in_the_chat_vocabulary() -> None:
    answer = {
        "id": "msg_1",
        "type": "message",
        "model": "claude-x",
        "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "tu_1", "name": "lookup", "input": {"sku": "A1"}},
        ],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 11, "output_tokens": 4},
    }
    completion = PROVIDER.parse(json.dumps(answer).encode(), 0.25)
    assert (completion.text, completion.model, completion.response_id) == (
        "Let me look.",
        "claude-x",
        "msg_1",
    )
    assert completion.finish_reason == "tool_calls"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (11, 4)
    assert completion.usage.total_tokens == 15
    (call,) = completion.tool_calls
    assert (call.id, call.name, json.loads(call.arguments)) == ("tu_1", "lookup", {"sku": "A1"})
    cut = {**answer, "content": [{"type": "text", "text": "a"}], "stop_reason": "max_tokens"}
    assert PROVIDER.parse(json.dumps(cut).encode(), 0.1).truncated


@pytest.mark.parametrize(
    "body", [b"not json", b"{}", b'{"content": "text"}', b'{"content": [{"type": "text"}]}']
)
def test_what_is_not_a_message_is_malformed(body: bytes) -> None:
    with pytest.raises(LLMMalformedResponseError, match="not an Anthropic message"):
        PROVIDER.parse(body, 0.1)


def test_errors_and_rate_limit_headers() -> None:
    body = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    error = PROVIDER.error(529, {"retry-after": "3"}, json.dumps(body).encode(), "")
    assert (error.status_code, error.retry_after, error.transient) == (529, 3.0, True)
    assert str(error) == "LLM provider answered HTTP 529: Overloaded"
    assert PROVIDER.hold_off(200, {}) is None
    assert PROVIDER.hold_off(429, {"retry-after": "2"}) == (2.0, False)
    reset = (datetime.now(UTC) + timedelta(seconds=30)).isoformat().replace("+00:00", "Z")
    spent = {"anthropic-ratelimit-requests-remaining": "0"}
    hold = PROVIDER.hold_off(200, spent | {"anthropic-ratelimit-requests-reset": reset})
    assert hold is not None
    assert hold.full_reset
    assert 28 < hold.seconds <= 30
    left = {"anthropic-ratelimit-requests-remaining": "5"}
    assert PROVIDER.hold_off(200, left | {"anthropic-ratelimit-requests-reset": reset}) is None
    assert PROVIDER.hold_off(200, spent | {"anthropic-ratelimit-requests-reset": "soon"}) is None


def test_llm_provider_selects_the_provider() -> None:
    chosen = ResilientLLMClient.from_settings(Settings(llm_provider="anthropic"), api_key="k")
    assert isinstance(chosen.provider, AnthropicProvider)
    assert chosen.http_client.headers["x-api-key"] == "k"
    assert "authorization" not in chosen.http_client.headers
    assert isinstance(ResilientLLMClient(settings=Settings()).provider, OpenAIProvider)
    with pytest.raises(ConfigurationError, match="LLM_PROVIDER='gemini': one of anthropic"):
        ResilientLLMClient.from_settings(Settings(llm_provider="gemini"))


# -- end to end against the simulator ---------------------------------------------------------


@pytest.fixture
async def sim() -> AsyncIterator[LLMSimulator]:
    async with LLMSimulator(Faults(api_key=KEY)) as simulator:
        yield simulator


def client_for(sim: LLMSimulator, **overrides: Any) -> ResilientLLMClient:
    options: dict[str, Any] = {
        "base_url": sim.base_url,
        "api_key": KEY,
        "breaker_name": f"ant-{uuid.uuid4().hex[:8]}",
    }
    settings = Settings(llm_provider="anthropic", llm_model="claude-sim")
    return ResilientLLMClient.from_settings(settings, **(options | overrides))


async def test_a_message_and_its_stream_are_the_same_answer(sim: LLMSimulator) -> None:
    deltas: list[str] = []
    async with client_for(sim) as client:
        plain = await client.complete(PRODUCT)
        streamed = await client.complete(PRODUCT, stream=True, on_delta=deltas.append)
        cut = await client.complete(PRODUCT, max_tokens=2)
    assert json.loads(plain.text)["description"]
    assert (plain.model, plain.finish_reason, plain.streamed) == ("claude-sim", "stop", False)
    assert plain.usage.prompt_tokens > 0
    assert plain.usage.completion_tokens > 0
    assert (streamed.text, streamed.usage, streamed.streamed) == (plain.text, plain.usage, True)
    assert "".join(deltas) == plain.text
    assert len(deltas) > 1
    assert cut.truncated
    assert sim.outcomes() == {"ok": 3}


async def test_a_wrong_key_is_a_401_that_never_counts(sim: LLMSimulator) -> None:
    async with client_for(sim, api_key="sk-wrong") as client:
        for _ in range(4):
            with pytest.raises(LLMHTTPStatusError, match="HTTP 401: invalid API key"):
                await client.complete(PRODUCT)
        assert client.circuit_breaker.state.value == "closed"


async def test_overloaded_opens_the_breaker_and_fallback_answers(sim: LLMSimulator) -> None:
    sim.model_faults["claude-busy"] = Faults(error_rate=1.0, error_statuses=(529,))
    async with client_for(sim, model="claude-busy") as client:
        for _ in range(3):
            with pytest.raises(LLMHTTPStatusError, match="HTTP 529: simulated failure") as error:
                await client.complete(PRODUCT)
            assert error.value.retry_after == 1.0
        with pytest.raises(CircuitOpenError):
            await client.complete(PRODUCT)
        answered = await client.complete(PRODUCT, fallback_models=["claude-sim"])
    assert answered.model == "claude-sim"
    assert sim.requests == 4  # the open breaker sent nothing


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("midstream_error_rate", LLMConnectionError),
        ("midstream_reset_rate", LLMConnectionError),
        ("malformed_rate", LLMMalformedResponseError),
    ],
)
async def test_a_stream_that_fails_after_200_counts(
    sim: LLMSimulator, fault: str, error: type[Exception]
) -> None:
    sim.faults.update({fault: 1.0})
    async with client_for(sim, fail_max=1) as client:
        with pytest.raises(error):
            await client.complete(PRODUCT, stream=True)
        assert client.circuit_breaker.state.value == "open"


async def test_the_fleets_limiter_heeds_the_providers_429(redis: aioredis.Redis) -> None:
    model = f"claude-{uuid.uuid4().hex[:6]}"
    limited = {model: Faults(error_rate=1.0, error_statuses=(429,), retry_after=20)}
    async with (
        LLMSimulator(model_faults=limited) as sim,
        client_for(
            sim,
            model=model,
            redis=redis,
            clock=FakeClock(time.time()),
            rate_limit=RateLimit(rpm=6000),
        ) as client,
    ):
        with pytest.raises(LLMHTTPStatusError, match="HTTP 429"):
            await client.complete(PRODUCT)
        with pytest.raises(LLMRateLimitedError) as held:
            await client.complete(PRODUCT)
        assert held.value.retry_after == pytest.approx(20.0, abs=0.1)
        assert client.circuit_breaker.state.value == "closed"  # the limiter's business
    assert sim.requests == 1


async def test_the_simulators_rate_limit_headers_are_anthropics() -> None:
    async with (
        LLMSimulator(Faults(rpm=60, rate_burst_s=1)) as sim,
        client_for(sim, api_key="") as client,
    ):
        answer = await client.http_client.post(
            "/messages", json={"model": "m", "max_tokens": 5, "messages": PRODUCT}
        )
        limited = await client.http_client.post(
            "/messages", json={"model": "m", "max_tokens": 5, "messages": PRODUCT}
        )
    assert answer.status_code == 200
    assert answer.headers["anthropic-ratelimit-requests-remaining"] == "0"
    reset = datetime.fromisoformat(answer.headers["anthropic-ratelimit-requests-reset"])
    assert 0 < reset.timestamp() - time.time() <= 61
    assert "x-ratelimit-remaining-requests" not in answer.headers
    assert limited.status_code == 429
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert float(limited.headers["retry-after"]) > 0
