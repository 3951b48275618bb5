"""ResilientLLMClient pinned where a user would notice a change (found by
scripts/mutation.py): what trips the breaker, Retry-After and rate-limit headers, error
texts, breaker names and bounds, fallback models, and what goes on the wire. Over
httpx.MockTransport: no network, no simulator."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
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
from aura.llm._wire import transport_error
from aura.llm.client import (
    DEFAULT_SIMULATOR_URL,
    MAX_BREAKERS,
    ResilientLLMClient,
    provider_hold_off,
    provider_of,
    trips_breaker,
)
from tests.helpers import FakeClock, metric

MESSAGES = [{"role": "user", "content": "hello"}]


def answer(text: str = "hi", model: str = "gpt-4o-mini") -> dict[str, Any]:
    return {
        "id": "c-1",
        "object": "chat.completion",
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


Handler = Callable[[httpx.Request], httpx.Response]


def client_with(handler: Handler, **overrides: Any) -> ResilientLLMClient:
    options: dict[str, Any] = {
        "settings": Settings(),
        "base_url": "http://llm.test:9000/v1/",
        "api_key": "sk-pins",
        "clock": FakeClock(),
        "transport": httpx.MockTransport(handler),
    }
    return ResilientLLMClient.from_settings(**(options | overrides))


# -- pure helpers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "trips"),
    [
        (LLMHTTPStatusError(500, "x"), True),
        (LLMHTTPStatusError(429, "x"), True),
        (LLMHTTPStatusError(408, "x"), True),
        (LLMHTTPStatusError(400, "x"), False),
        (LLMHTTPStatusError(401, "x"), False),
        (LLMTimeoutError("t"), True),
        (LLMConnectionError("c"), True),
        (LLMMalformedResponseError("m"), True),
        (ValueError("v"), False),
    ],
    ids=repr,
)
def test_what_trips_the_breaker(exc: BaseException, trips: bool) -> None:
    assert trips_breaker(exc) is trips


def test_retry_after_in_seconds_or_as_a_date() -> None:
    def hold(headers: dict[str, str]) -> tuple[float, bool] | None:
        return provider_hold_off(httpx.Headers(headers))

    assert hold({"retry-after": "7"}) == (7.0, False)
    assert hold({"retry-after": "1.5"}) == (1.5, False)
    assert hold({"retry-after": "-3"}) == (0.0, False)
    soon = format_datetime(datetime.now(UTC) + timedelta(seconds=100), usegmt=True)
    found = hold({"retry-after": soon})
    assert found is not None
    assert 90 < found[0] <= 100
    past = format_datetime(datetime.now(UTC) - timedelta(seconds=100), usegmt=True)
    assert hold({"retry-after": past}) == (0.0, False)
    assert hold({"retry-after": "soon"}) is None
    assert hold({}) is None


def test_the_request_budgets_reset_when_it_is_spent() -> None:
    def hold(headers: dict[str, str]) -> tuple[float, bool] | None:
        return provider_hold_off(httpx.Headers(headers))

    spent = {"x-ratelimit-remaining-requests": "0"}
    assert hold(spent | {"x-ratelimit-reset-requests": "1m30s"}) == (90.0, True)
    assert hold(spent | {"x-ratelimit-reset-requests": "250ms"}) == (0.25, True)
    assert hold(spent | {"x-ratelimit-reset-requests": "1h"}) == (3600.0, True)
    assert hold(spent | {"x-ratelimit-reset-requests": "2.5s"}) == (2.5, True)
    assert hold(spent | {"x-ratelimit-reset-requests": "whenever"}) is None
    assert hold(spent) is None
    left = {"x-ratelimit-remaining-requests": "1", "x-ratelimit-reset-requests": "1s"}
    assert hold(left) is None
    both = spent | {"x-ratelimit-reset-requests": "1s", "retry-after": "4"}
    assert hold(both) == (4.0, False)  # Retry-After wins


def test_provider_of_a_base_url() -> None:
    assert provider_of("http://llm.test:9000/v1") == "llm.test:9000"
    assert provider_of("https://api.openai.com/v1") == "api.openai.com"
    assert provider_of("https://user:secret@host.test/v1") == "host.test"
    assert provider_of("/relative") == "provider"


def test_transport_errors_become_ours() -> None:
    timed_out = transport_error(httpx.ReadTimeout("slow"))
    assert isinstance(timed_out, LLMTimeoutError)
    assert str(timed_out) == "ReadTimeout talking to the LLM provider"
    refused = transport_error(httpx.ConnectError("refused " + "x" * 500))
    assert isinstance(refused, LLMConnectionError)
    assert str(refused).startswith("ConnectError: refused")
    assert len(str(refused)) == 200
    mapped = httpx.ConnectTimeout("mapped by httpx_aiohttp")
    mapped.__cause__ = aiohttp.ServerDisconnectedError()
    reset = transport_error(mapped)
    assert isinstance(reset, LLMConnectionError)  # a reset, not a timeout
    assert str(reset).startswith("ServerDisconnectedError")
    slow = httpx.ConnectTimeout("mapped")
    slow.__cause__ = aiohttp.ServerTimeoutError()
    assert isinstance(transport_error(slow), LLMTimeoutError)
    raw = transport_error(aiohttp.ClientOSError(104, "reset"))
    assert isinstance(raw, LLMConnectionError)


# -- the client ---------------------------------------------------------------------------------


def test_construction() -> None:
    client = client_with(lambda _: httpx.Response(200, json=answer()))
    assert client.base_url == "http://llm.test:9000/v1"
    assert client.http_client.headers["authorization"] == "Bearer sk-pins"
    assert client.http_client.follow_redirects is False
    assert client.model == "gpt-4o-mini"
    assert (client.deadline, client.first_token_timeout) == (30.0, 10.0)
    assert client.circuit_breaker.name == "llm:llm.test:9000/gpt-4o-mini"
    assert client.breakers == {client.circuit_breaker.name: client.circuit_breaker}
    assert (client.circuit_breaker.fail_max, client.circuit_breaker.reset_timeout) == (3, 60.0)
    assert client.circuit_breaker.failure_window == 60.0
    keyless = client_with(lambda _: httpx.Response(200), api_key="")
    assert "authorization" not in keyless.http_client.headers
    overridden = client_with(
        lambda _: httpx.Response(200), fail_max=5, reset_timeout=9.0, deadline=4.0
    )
    assert (overridden.circuit_breaker.fail_max, overridden.circuit_breaker.reset_timeout) == (
        5,
        9.0,
    )
    assert overridden.deadline == 4.0
    assert DEFAULT_SIMULATOR_URL == "http://127.0.0.1:8765/v1"


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("provider_model", "llm:llm.test:9000/m"),
        ("model", "llm:m"),
        ("provider", "llm:llm.test:9000"),
    ],
)
def test_breaker_names_by_key(key: str, name: str) -> None:
    client = client_with(lambda _: httpx.Response(200), settings=Settings(circuit_breaker_key=key))
    assert client.breaker_name_for("m") == name


def test_at_most_max_breakers_models() -> None:
    assert MAX_BREAKERS == 64
    client = client_with(lambda _: httpx.Response(200))
    for number in range(MAX_BREAKERS - 1):  # the default model has one already
        client.breaker_for(f"model-{number}")
    assert len(client.breakers) == MAX_BREAKERS
    assert client.breaker_for("model-0") is client.breakers["llm:llm.test:9000/model-0"]
    with pytest.raises(ValueError, match="more than 64 models"):
        client.breaker_for("one-too-many")


async def test_the_request_on_the_wire_and_the_answer() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=answer("bonjour"))

    before = metric("aura_llm_requests_total", model="gpt-4o-mini", outcome="success")
    async with client_with(handler) as client:
        with pytest.raises(ValueError, match="messages must not be empty"):
            await client.complete([])
        result = await client.complete(MESSAGES, temperature=0)
    assert result.text == "bonjour"
    (request,) = seen
    assert request.url == "http://llm.test:9000/v1/chat/completions"
    assert json.loads(request.content) == {
        "model": "gpt-4o-mini",
        "messages": MESSAGES,
        "temperature": 0,
    }
    assert metric("aura_llm_requests_total", model="gpt-4o-mini", outcome="success") == before + 1


@pytest.mark.parametrize(
    ("response", "error", "outcome"),
    [
        (
            httpx.Response(503, json={"error": {"message": "overloaded"}}),
            LLMHTTPStatusError,
            "http_error",
        ),
        (httpx.Response(200, content=b"not json"), LLMMalformedResponseError, "malformed"),
    ],
)
async def test_failures_are_counted_by_outcome(
    response: httpx.Response, error: type[Exception], outcome: str
) -> None:
    before = metric("aura_llm_requests_total", model="gpt-4o-mini", outcome=outcome)
    async with client_with(lambda _: response) as client:
        with pytest.raises(error):
            await client.complete(MESSAGES)
    assert metric("aura_llm_requests_total", model="gpt-4o-mini", outcome=outcome) == before + 1


async def test_status_errors_carry_the_providers_text_and_retry_after() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            429,
            json={"error": {"message": "slow   down\n" + "x" * 400}},
            headers={"retry-after": "12"},
        )

    async with client_with(handler) as client:
        with pytest.raises(LLMHTTPStatusError) as caught:
            await client.complete(MESSAGES)
    error = caught.value
    assert (error.status_code, error.retry_after) == (429, 12.0)
    assert str(error).startswith("LLM provider answered HTTP 429: slow down x")
    assert len(str(error)) == len("LLM provider answered HTTP 429: ") + 200

    async with client_with(lambda _: httpx.Response(404, content=b"<html>")) as client:
        with pytest.raises(LLMHTTPStatusError, match=r"HTTP 404: Not Found$"):
            await client.complete(MESSAGES)
    async with client_with(lambda _: httpx.Response(400, json=["a list"])) as client:
        with pytest.raises(LLMHTTPStatusError, match=r"HTTP 400: Bad Request$") as bad:
            await client.complete(MESSAGES)
    assert bad.value.retry_after is None


async def test_a_4xx_never_opens_the_breaker_and_a_5xx_does() -> None:
    async with client_with(lambda _: httpx.Response(400, json={})) as client:
        for _ in range(5):
            with pytest.raises(LLMHTTPStatusError):
                await client.complete(MESSAGES)
        assert client.circuit_breaker.state.value == "closed"
    async with client_with(lambda _: httpx.Response(502, json={})) as client:
        for _ in range(3):
            with pytest.raises(LLMHTTPStatusError):
                await client.complete(MESSAGES)
        with pytest.raises(CircuitOpenError):
            await client.complete(MESSAGES)


async def test_fallback_models_and_the_soonest_retry_after() -> None:
    clock = FakeClock()
    failing = {"a", "b"}

    def handler(request: httpx.Request) -> httpx.Response:
        model = json.loads(request.content)["model"]
        if model in failing:
            return httpx.Response(500, json={})
        return httpx.Response(200, json=answer(model, model=model))

    async with client_with(handler, clock=clock, model="a") as client:
        for _ in range(3):
            with pytest.raises(LLMHTTPStatusError):
                await client.complete(MESSAGES)  # opens a
        clock.advance(10)
        for _ in range(3):
            with pytest.raises(LLMHTTPStatusError):
                await client.complete(MESSAGES, model="b")  # opens b, 10 s later
        result = await client.complete(MESSAGES, fallback_models=["b", "c"])
        assert (result.text, result.model) == ("c", "c")
        with pytest.raises(CircuitOpenError) as refused:
            await client.complete(MESSAGES, model="b", fallback_models=["a"])
        assert refused.value.retry_after == pytest.approx(50.0)  # a's, sooner than b's 60
        with pytest.raises(CircuitOpenError) as only_b:
            await client.complete(MESSAGES, model="b")
        assert only_b.value.retry_after == pytest.approx(60.0)


async def test_a_streamed_call_asks_for_usage() -> None:
    seen: list[dict[str, Any]] = []
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}],
    }
    stream = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, content=stream, headers={"content-type": "text/event-stream"})

    deltas: list[str] = []
    async with client_with(handler) as client:
        result = await client.complete(MESSAGES, stream=True, on_delta=deltas.append)
        await client.complete(MESSAGES, stream=True, stream_options={"include_usage": False})
    assert result.text == "hi"
    assert deltas == ["hi"]
    assert seen[0]["stream"] is True
    assert seen[0]["stream_options"] == {"include_usage": True}
    assert seen[1]["stream_options"] == {"include_usage": False}


async def test_a_streamed_error_status_is_ours() -> None:
    async with client_with(lambda _: httpx.Response(503, json={"error": {"message": "busy"}})) as c:
        with pytest.raises(LLMHTTPStatusError, match="HTTP 503: busy"):
            await c.complete(MESSAGES, stream=True)


def test_the_reset_header_is_read_in_its_first_32_characters() -> None:
    value = "1s" + "." * 29 + "2s"  # the second part starts at character 32
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": value}
    assert provider_hold_off(httpx.Headers(headers)) == (1.0, True)


def test_the_transport_is_aiohttp_unless_configured_otherwise() -> None:
    default = ResilientLLMClient(settings=Settings())
    assert type(default.http_client._transport).__name__ == "AiohttpTransport"
    plain = ResilientLLMClient(settings=Settings(llm_http_transport="httpx"))
    assert isinstance(plain.http_client._transport, httpx.AsyncHTTPTransport)


@pytest.mark.parametrize(("concurrency", "connections"), [(50, 100), (200, 220)])
async def test_a_redis_of_its_own_fails_fast(concurrency: int, connections: int) -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1/0", worker_concurrency=concurrency)
    client = ResilientLLMClient(settings=settings)
    assert client.circuit_breaker.shared
    pool = client._redis.connection_pool  # type: ignore[union-attr]
    assert pool.max_connections == connections
    assert pool.timeout == 5.0  # waits for a free connection (back-pressure), bounded
    kwargs = pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.5, 0.5)
    await client.aclose()
    given = ResilientLLMClient(settings=settings, redis=client._redis)
    assert given._owned_redis is None  # the caller's client is the caller's to close


async def test_the_trial_lease_is_the_deadline_and_five_seconds() -> None:
    import asyncio

    clock = FakeClock()
    release, trial_started = asyncio.Event(), asyncio.Event()
    calls: list[int] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) <= 3:
            return httpx.Response(500, json={})
        trial_started.set()
        await release.wait()
        return httpx.Response(200, json=answer())

    async with client_with(handler, clock=clock, deadline=4.0) as client:
        for _ in range(3):
            with pytest.raises(LLMHTTPStatusError):
                await client.complete(MESSAGES)
        clock.advance(60)
        trial = asyncio.create_task(client.complete(MESSAGES))
        await asyncio.wait_for(trial_started.wait(), 10)
        with pytest.raises(CircuitOpenError) as rejected:  # the breaker refuses meanwhile
            await client.circuit_breaker.call(trial_started.wait)
        assert rejected.value.retry_after == pytest.approx(9.0)
        # ... and the client waits for the trial's outcome instead of deferring by its lease
        waiting = asyncio.create_task(client.complete(MESSAGES))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        release.set()
        assert (await trial).text == "hi"
        assert (await asyncio.wait_for(waiting, 10)).text == "hi"


def slow_stream(*chunks: bytes, hold: asyncio.Event | None = None) -> Any:
    async def body() -> Any:
        for chunk in chunks:
            await asyncio.sleep(0)
            yield chunk
        if hold is not None:
            await hold.wait()

    return body()


def sse(text: str, *, done: bool) -> bytes:
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "model": "gpt-4o-mini",
        "choices": [
            {"index": 0, "delta": {"content": text}, "finish_reason": "stop" if done else None}
        ],
    }
    return f"data: {json.dumps(chunk)}\n\n".encode() + (b"data: [DONE]\n\n" if done else b"")


async def test_a_stream_read_chunk_by_chunk_within_its_deadlines() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        content = slow_stream(sse("he", done=False), sse("llo", done=True))
        return httpx.Response(200, content=content, headers={"content-type": "text/event-stream"})

    async with client_with(handler, deadline=30.0, first_token_timeout=10.0) as client:
        result = await client.complete(MESSAGES, stream=True)
    assert result.text == "hello"
    assert 0 < result.latency_s < 30


@pytest.mark.timeout(10)
async def test_no_first_token_in_time_is_a_first_token_timeout() -> None:
    forever = asyncio.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, content=slow_stream(hold=forever), headers={"content-type": "text/event-stream"}
        )

    async with client_with(handler, deadline=30.0, first_token_timeout=0.05) as client:
        with pytest.raises(LLMTimeoutError, match=r"no first token within 0.05s"):
            await client.complete(MESSAGES, stream=True)


async def test_a_streamed_error_body_is_read_for_its_message() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.dumps({"error": {"message": "busy"}}).encode()
        return httpx.Response(503, content=slow_stream(body))

    async with client_with(handler) as client:
        with pytest.raises(LLMHTTPStatusError, match="HTTP 503: busy"):
            await client.complete(MESSAGES, stream=True)


async def test_a_completions_latency_is_its_own() -> None:
    async with client_with(lambda _: httpx.Response(200, json=answer())) as client:
        result = await client.complete(MESSAGES)
    assert 0 < result.latency_s < 30


@pytest.mark.timeout(10)
async def test_after_the_first_token_the_whole_deadline_applies() -> None:
    async def body() -> Any:
        yield sse("he", done=False)
        await asyncio.sleep(0.3)  # the provider pauses longer than the first-token limit
        yield sse("llo", done=True)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})

    async with client_with(handler, deadline=10.0, first_token_timeout=0.05) as client:
        assert (await client.complete(MESSAGES, stream=True)).text == "hello"


@pytest.mark.timeout(10)
async def test_a_stream_that_stops_midway_is_a_deadline_timeout() -> None:
    forever = asyncio.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        content = slow_stream(sse("he", done=False), hold=forever)
        return httpx.Response(200, content=content, headers={"content-type": "text/event-stream"})

    async with client_with(handler, deadline=0.2, first_token_timeout=0.1) as client:
        with pytest.raises(LLMTimeoutError, match=r"^no complete answer within 0.2s$"):
            await client.complete(MESSAGES, stream=True)


async def test_streamed_calls_are_counted_and_timed() -> None:
    from prometheus_client import REGISTRY

    def handler(request: httpx.Request) -> httpx.Response:
        content = slow_stream(sse("hi", done=True))
        return httpx.Response(200, content=content, headers={"content-type": "text/event-stream"})

    def duration_sum(outcome: str = "success") -> float:
        value = REGISTRY.get_sample_value(
            "llm_api_request_duration_seconds_sum", {"outcome": outcome}
        )
        return value or 0.0

    labels = {"model": "gpt-4o-mini"}
    success = metric("aura_llm_requests_total", outcome="success", **labels)
    failed = metric("aura_llm_requests_total", outcome="http_error", **labels)
    summed, summed_errors = duration_sum(), duration_sum("http_error")
    async with client_with(handler) as client:
        await client.complete(MESSAGES, stream=True)
    assert metric("aura_llm_requests_total", outcome="success", **labels) == success + 1
    assert 0 < duration_sum() - summed < 60
    async with client_with(lambda _: httpx.Response(502, content=slow_stream(b"{}"))) as client:
        with pytest.raises(LLMHTTPStatusError):
            await client.complete(MESSAGES, stream=True)
    assert metric("aura_llm_requests_total", outcome="http_error", **labels) == failed + 1
    assert 0 < duration_sum("http_error") - summed_errors < 60  # seconds, not clock readings


def throttled(_: httpx.Request) -> httpx.Response:
    return httpx.Response(429, json={"error": {"message": "slow down"}})


async def test_a_429_trips_the_breaker_unless_the_fleets_limiter_holds_off(
    redis_url: str,
) -> None:
    import redis.asyncio as aioredis

    from aura.llm.ratelimit import RateLimit

    shared = aioredis.from_url(redis_url)
    name = f"pins-{uuid.uuid4().hex[:8]}"
    try:
        limited = client_with(
            throttled, redis=shared, rate_limit=RateLimit(rpm=600_000), breaker_name=name
        )
        for _ in range(3):
            with pytest.raises(LLMHTTPStatusError):
                await limited.complete(MESSAGES)
        assert limited.circuit_breaker.state.value == "closed"  # the limiter's business
        await limited.aclose()
        unlimited = client_with(throttled, redis=shared, breaker_name=name + "-u")
        for _ in range(3):
            with pytest.raises(LLMHTTPStatusError):
                await unlimited.complete(MESSAGES)
        assert unlimited.circuit_breaker.state.value == "open"  # no limiter: a failure
        await unlimited.aclose()
    finally:
        await shared.aclose()


def test_a_limiter_per_model_within_the_bound_on_models() -> None:
    client = client_with(lambda _: httpx.Response(200))
    limiter = client.limiter_for("other-model")
    assert client.limiter_for("other-model") is limiter
    assert "llm:llm.test:9000/other-model" in client.breakers


async def test_aclose_closes_the_redis_it_made_only() -> None:
    closed: list[str] = []
    client = ResilientLLMClient(settings=Settings(redis_url="redis://127.0.0.1:1/0"))
    owned = client._owned_redis
    assert owned is not None
    real = owned.aclose

    async def recording() -> None:
        closed.append("owned")
        await real()

    owned.aclose = recording  # type: ignore[method-assign]
    await client.aclose()
    assert closed == ["owned"]
