"""The provider seam: a provider written here, in the test, runs through the client with
its breaker and its errors, and LLM_PROVIDER finds it by one registry line; the client
takes its parts, and an explicit 0 from a caller is a value, not "use the setting"."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from aura.config import Settings, get_settings
from aura.errors import CircuitOpenError, LLMHTTPStatusError, LLMMalformedResponseError
from aura.llm import (
    PROVIDERS,
    BreakerPolicy,
    CallPolicy,
    Completion,
    HoldOff,
    HttpxWire,
    ProviderRequest,
    ResilientLLMClient,
    StreamParser,
    Usage,
)
from aura.llm._provider import status_error
from tests.helpers import FakeClock
from tests.llm.support import MESSAGES


@dataclass(frozen=True)
class EchoProvider:
    """A toy API: POST /echo {"say": text, "engine": model} -> {"said": text, "cost": n}."""

    base_url: str
    api_key: str = ""
    name: str = "echo"

    @property
    def headers(self) -> dict[str, str]:
        return {"x-echo-key": self.api_key}

    def request(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        params: Mapping[str, Any],
        *,
        stream: bool,
    ) -> ProviderRequest:
        said = " ".join(str(m["content"]) for m in messages)
        return ProviderRequest("/echo", {"say": said, "engine": model, "messages": []})

    def parse(self, content: bytes, latency_s: float) -> Completion:
        try:
            body = json.loads(content)
            text, cost = str(body["said"]), int(body["cost"])
        except (ValueError, KeyError, TypeError) as exc:
            raise LLMMalformedResponseError("not an echo") from exc
        return Completion(text, "echo-1", Usage(cost, cost, 2 * cost), latency_s, "stop")

    def stream_parser(self) -> StreamParser:
        raise NotImplementedError("echo does not stream")

    def error(
        self, status: int, headers: Mapping[str, str], content: bytes, reason: str
    ) -> LLMHTTPStatusError:
        return status_error(status, headers, content, reason)

    def hold_off(self, status: int, headers: Mapping[str, str]) -> HoldOff | None:
        return None


def echo_server(down: list[bool]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        if down[0]:
            return httpx.Response(503, json={"error": {"message": "echo is down"}})
        assert request.url.path == "/api/echo"
        assert request.headers["x-echo-key"] == "k"
        body = json.loads(request.content)
        return httpx.Response(200, json={"said": body["say"], "cost": len(body["say"])})

    return httpx.MockTransport(handle)


def echo_client(down: list[bool]) -> ResilientLLMClient:
    provider = EchoProvider("http://echo.test/api", "k")
    wire = HttpxWire(
        provider.base_url,
        provider.headers,
        timeout=httpx.Timeout(5.0),
        max_connections=10,
        transport=echo_server(down),
    )
    policy = CallPolicy(model="echo-1", breakers=BreakerPolicy(name="toy", fail_max=2))
    return ResilientLLMClient(provider, wire=wire, policy=policy, clock=FakeClock())


async def test_a_provider_defined_in_a_test_runs_through_the_client() -> None:
    down = [False]
    async with echo_client(down) as client:
        answer = await client.complete(MESSAGES)
        assert (answer.text, answer.usage.total_tokens) == ("hello", 10)
        assert client.circuit_breaker.name == "toy:echo.test/echo-1"
        down[0] = True
        for _ in range(2):
            with pytest.raises(LLMHTTPStatusError, match="HTTP 503: echo is down"):
                await client.complete(MESSAGES)
        with pytest.raises(CircuitOpenError):
            await client.complete(MESSAGES)


async def test_one_registry_line_lets_llm_provider_name_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PROVIDERS, "echo", EchoProvider)
    settings = Settings(llm_provider="echo", llm_base_url="http://echo.test/api", llm_model="e")
    client = ResilientLLMClient.from_settings(settings, api_key="k", transport=echo_server([False]))
    async with client:
        assert isinstance(client.provider, EchoProvider)
        assert (await client.complete(MESSAGES)).text == "hello"


async def test_the_constructor_reads_no_settings_when_given_its_parts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    get_settings.cache_clear()
    from_settings = ResilientLLMClient()
    assert from_settings._owned_redis is not None  # REDIS_URL: a pool of its own
    await from_settings.aclose()
    given = echo_client([False])
    assert given._redis is None
    assert given._owned_redis is None
    assert (given.model, given.deadline, given.first_token_timeout) == ("echo-1", 30.0, 10.0)
    await given.aclose()


def test_an_explicit_zero_is_a_value_not_the_setting() -> None:
    zeros = ResilientLLMClient.from_settings(
        Settings(), deadline=0.0, first_token_timeout=0.0, rate_limit=None
    )
    assert (zeros.deadline, zeros.first_token_timeout) == (0.0, 0.0)
    with pytest.raises(ValueError, match="fail_max must be >= 1"):  # not quietly 3
        ResilientLLMClient.from_settings(Settings(), fail_max=0)
    unset = ResilientLLMClient.from_settings(Settings(), deadline=None)
    assert unset.deadline == 30.0
