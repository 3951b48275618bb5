"""The whole protocol through ResilientLLMClient and the simulator: tool calls, length
cuts, several choices, JSON mode, usage, streaming and its faults, and what the breaker
counts (provider failures only, once per call)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from httpx_aiohttp import AiohttpTransport

from aura.config import Settings
from aura.errors import (
    CircuitOpenError,
    LLMConnectionError,
    LLMHTTPStatusError,
    LLMMalformedResponseError,
    LLMTimeoutError,
)
from aura.events import CircuitState
from aura.llm import Faults, LLMSimulator, ResilientLLMClient, StreamAssembler
from tests.helpers import FakeClock, metric, wait_until

MESSAGES = [{"role": "user", "content": json.dumps({"title": "Trail shoe", "brand": "Acme"})}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "save_enrichment",
            "parameters": {"type": "object", "properties": {"description": {"type": "string"}}},
        },
    }
]
pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def sim() -> AsyncIterator[LLMSimulator]:
    async with LLMSimulator(models=("gpt-4o-mini", "other-model")) as simulator:
        yield simulator


def client_for(sim: LLMSimulator, **overrides: Any) -> ResilientLLMClient:
    options: dict[str, Any] = {
        "settings": Settings(),
        "base_url": sim.base_url,
        "clock": FakeClock(),
        "timeout": httpx.Timeout(connect=1.0, read=2.0, write=1.0, pool=1.0),
    }
    return ResilientLLMClient.from_settings(**(options | overrides))


# -- complete answers are successes ---------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_a_tool_call_answer_is_a_success(sim: LLMSimulator, stream: bool) -> None:
    async with client_for(sim) as client:
        result = await client.complete(MESSAGES, tools=TOOLS, stream=stream)
        assert client.circuit_breaker.state is CircuitState.CLOSED
        assert client.circuit_breaker._record.failures == 0
    assert result.text == ""
    assert result.choices[0].content is None
    assert result.finish_reason == "tool_calls"
    (call,) = result.tool_calls
    assert call.name == "save_enrichment"
    assert call.id.startswith("call_")
    assert json.loads(call.arguments)["description"].startswith("Trail shoe by Acme")
    assert result.streamed is stream


@pytest.mark.parametrize("stream", [False, True])
async def test_a_length_cut_is_an_answer_not_an_error(sim: LLMSimulator, stream: bool) -> None:
    async with client_for(sim) as client:
        full = await client.complete(MESSAGES)
        cut = await client.complete(MESSAGES, max_tokens=3, stream=stream)
        assert client.circuit_breaker._record.failures == 0
    assert cut.truncated
    assert cut.finish_reason == "length"
    assert full.text.startswith(cut.text)
    assert len(cut.text.split(" ")) == 3
    assert cut.usage.completion_tokens == 3


@pytest.mark.parametrize("stream", [False, True])
async def test_several_choices_json_mode_and_usage(sim: LLMSimulator, stream: bool) -> None:
    async with client_for(sim) as client:
        result = await client.complete(
            MESSAGES, n=3, response_format={"type": "json_object"}, stream=stream
        )
    assert [choice.index for choice in result.choices] == [0, 1, 2]
    assert all(json.loads(choice.content or "")["tags"] for choice in result.choices)
    assert result.usage.prompt_tokens > 0
    assert result.usage.completion_tokens == 3 * len(result.text.split())
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert result.model == "gpt-4o-mini"


async def test_a_stream_hands_over_its_deltas_as_they_come(sim: LLMSimulator) -> None:
    deltas: list[str] = []
    async with client_for(sim) as client:
        streamed = await client.complete(MESSAGES, stream=True, on_delta=deltas.append)
        plain = await client.complete(MESSAGES)
    assert len(deltas) > 5
    assert "".join(deltas) == streamed.text == plain.text
    assert streamed.response_id == plain.response_id


# -- what the breaker counts --------------------------------------------------------------------


async def test_a_mid_stream_reset_is_one_failure(sim: LLMSimulator) -> None:
    sim.faults.update({"midstream_reset_rate": 1.0})
    deltas: list[str] = []
    before = metric("llm_api_request_duration_seconds_count", outcome="connection_error")
    async with client_for(sim) as client:
        with pytest.raises(LLMConnectionError):
            await client.complete(MESSAGES, stream=True, on_delta=deltas.append)
        assert client.circuit_breaker._record.failures == 1
    assert deltas  # it had started: the reset came mid-stream
    assert metric("llm_api_request_duration_seconds_count", outcome="connection_error") == (
        before + 1
    )


@pytest.mark.parametrize(
    ("fault", "error"),
    [("midstream_error_rate", LLMConnectionError), ("malformed_rate", LLMMalformedResponseError)],
)
async def test_a_stream_that_fails_after_200_is_a_provider_failure(
    sim: LLMSimulator, fault: str, error: type[Exception]
) -> None:
    sim.faults.update({fault: 1.0})
    async with client_for(sim) as client:
        with pytest.raises(error):
            await client.complete(MESSAGES, stream=True)
        assert client.circuit_breaker._record.failures == 1


async def test_no_first_token_in_time_is_a_timeout(sim: LLMSimulator) -> None:
    sim.faults.update({"latency": 5.0})
    async with client_for(sim, first_token_timeout=0.2) as client:
        with pytest.raises(LLMTimeoutError, match=r"no first token within 0\.2s"):
            await client.complete(MESSAGES, stream=True)
        assert client.circuit_breaker._record.failures == 1


async def test_a_stream_that_trickles_past_the_deadline_is_a_timeout(sim: LLMSimulator) -> None:
    sim.faults.update({"trickle_rate": 1.0, "trickle_interval": 0.1})
    deltas: list[str] = []
    async with client_for(sim, first_token_timeout=1.0, deadline=0.5) as client:
        with pytest.raises(LLMTimeoutError, match=r"no complete answer within 0\.5s"):
            await client.complete(MESSAGES, stream=True, on_delta=deltas.append)
    assert deltas  # the first token came in time; the whole answer did not


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_request_errors_never_count(sim: LLMSimulator, status: int) -> None:
    sim.faults.update({"error_rate": 1.0, "error_statuses": [status]})
    async with client_for(sim) as client:
        for _ in range(4):
            with pytest.raises(LLMHTTPStatusError) as raised:
                await client.complete(MESSAGES, stream=status % 2 == 0)
            assert raised.value.status_code == status
            assert not raised.value.transient
        assert client.circuit_breaker.state is CircuitState.CLOSED
        assert client.circuit_breaker._record.failures == 0


async def test_an_unknown_model_is_a_404_that_never_counts(sim: LLMSimulator) -> None:
    async with client_for(sim, model="no-such-model") as client:
        for _ in range(4):
            with pytest.raises(LLMHTTPStatusError, match="404"):
                await client.complete(MESSAGES)
        assert client.circuit_breaker._record.failures == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_a_callers_cancellation_never_counts_and_closes_the_connection(
    sim: LLMSimulator, stream: bool
) -> None:
    sim.faults.update({"trickle_rate": 1.0, "trickle_interval": 0.05})
    async with client_for(sim, deadline=20.0, first_token_timeout=20.0) as client:
        for _ in range(4):  # more than fail_max
            started = sim.requests
            call = asyncio.create_task(client.complete(MESSAGES, stream=stream))

            async def received() -> bool:
                return sim.requests > started  # noqa: B023

            await wait_until(received, within=5)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        assert client.circuit_breaker.state is CircuitState.CLOSED
        assert client.circuit_breaker._record.failures == 0
        if stream:

            async def all_abandoned() -> bool:
                return sim.stats["stream_abandoned"] == 4

            await wait_until(all_abandoned, within=5)  # the simulator saw each one hang up


async def test_an_unparseable_body_counts(sim: LLMSimulator) -> None:
    sim.faults.update({"malformed_rate": 1.0})
    async with client_for(sim) as client:
        for _ in range(3):
            with pytest.raises(LLMMalformedResponseError):
                await client.complete(MESSAGES)
        assert client.circuit_breaker.state is CircuitState.OPEN


# -- a breaker per provider and model ---------------------------------------------------------


async def test_a_failing_model_leaves_another_models_calls_alone() -> None:
    async with (
        LLMSimulator(
            model_faults={"bad-model": Faults(error_rate=1.0, error_statuses=(500,))}
        ) as sim,
        client_for(sim, model="bad-model") as client,
    ):
        bad = client.breaker_for("bad-model").name
        opens = metric("aura_llm_circuit_breaker_opens_total", breaker=bad)
        failed = metric("aura_llm_requests_total", model="bad-model", outcome="http_error")
        answered = metric("aura_llm_requests_total", model="gpt-4o-mini", outcome="success")
        tokens = metric("aura_llm_tokens_total", model="gpt-4o-mini", kind="completion")
        for _ in range(3):
            with pytest.raises(LLMHTTPStatusError):
                await client.complete(MESSAGES)
        assert metric("aura_llm_circuit_breaker_opens_total", breaker=bad) == opens + 1
        assert metric("aura_llm_requests_total", model="bad-model", outcome="http_error") == (
            failed + 3
        )
        with pytest.raises(CircuitOpenError, match="bad-model"):
            await client.complete(MESSAGES)
        good = await client.complete(MESSAGES, model="gpt-4o-mini")
        assert good.model == "gpt-4o-mini"
        assert metric("aura_llm_requests_total", model="gpt-4o-mini", outcome="success") == (
            answered + 1
        )
        assert metric("aura_llm_tokens_total", model="gpt-4o-mini", kind="completion") == (
            tokens + good.usage.completion_tokens
        )
        assert client.breaker_for("bad-model").state is CircuitState.OPEN
        assert client.breaker_for("gpt-4o-mini").state is CircuitState.CLOSED
        assert client.circuit_breaker is client.breaker_for("bad-model")
        host = sim.base_url.split("/")[2]
        assert set(client.breakers) == {f"llm:{host}/bad-model", f"llm:{host}/gpt-4o-mini"}


async def test_fallback_models_answer_while_a_breaker_is_open() -> None:
    async with (
        LLMSimulator(
            model_faults={"bad-model": Faults(error_rate=1.0, error_statuses=(503,))}
        ) as sim,
        client_for(sim, model="bad-model") as client,
    ):
        for _ in range(3):
            with pytest.raises(LLMHTTPStatusError):  # a failure is the task's to retry
                await client.complete(MESSAGES, fallback_models=["gpt-4o"])
        received = sim.requests
        result = await client.complete(MESSAGES, fallback_models=["gpt-4o"])
        assert result.model == "gpt-4o"  # the answer says which model made it
        assert sim.requests == received + 1  # the open breaker sent nothing to bad-model
        with pytest.raises(CircuitOpenError):  # without a fallback, the open breaker refuses
            await client.complete(MESSAGES, fallback_models=[])


def test_the_breaker_key_is_configurable() -> None:
    def names(key: str) -> str:
        settings = Settings(circuit_breaker_key=key)  # type: ignore[arg-type]
        client = ResilientLLMClient.from_settings(
            settings=settings, base_url="http://user:secret@llm.example:8443/v1", model="m"
        )
        return client.circuit_breaker.name

    assert names("provider_model") == "llm:llm.example:8443/m"
    assert names("model") == "llm:m"
    assert names("provider") == "llm:llm.example:8443"  # never the credentials


def test_the_http_client_runs_over_aiohttp_sized_by_settings() -> None:
    client = ResilientLLMClient.from_settings(settings=Settings(llm_max_connections=321))
    transport = client.http_client._transport
    assert isinstance(client.http_client, httpx.AsyncClient)  # the seed's attribute holds
    assert isinstance(transport, AiohttpTransport)
    assert transport.limits.max_connections == 321
    plain = ResilientLLMClient.from_settings(settings=Settings(llm_http_transport="httpx"))
    assert not isinstance(plain.http_client._transport, AiohttpTransport)


# -- the stream assembler, fed exact events ------------------------------------------------------


def test_the_assembler_folds_tool_call_pieces_and_refuses_a_cut_stream() -> None:
    assembler = StreamAssembler()
    events = [
        {"id": "c1", "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant"}}]},
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f"}}]
                    },
                }
            ]
        },
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]},
                }
            ]
        },
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]},
                }
            ]
        },
    ]
    text = "".join(f"data: {json.dumps(event)}\r\n\r\n" for event in events)
    assembler.feed(text[:37])
    assembler.feed(text[37:])  # split anywhere: lines are put back together
    with pytest.raises(LLMConnectionError, match="ended before the answer did"):
        assembler.result(0.1)
    assembler.feed(
        'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}\n'
    )
    assembler.feed(": keep-alive comment\n\ndata: [DONE]\n\n")
    result = assembler.result(0.1)
    assert assembler.done
    assert (result.model, result.response_id, result.text) == ("m", "c1", "")
    assert [(c.id, c.name, c.arguments) for c in result.tool_calls] == [("call_1", "f", '{"a": 1}')]
