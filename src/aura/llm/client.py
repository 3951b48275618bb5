"""``ResilientLLMClient``: OpenAI-compatible chat completions under a circuit breaker.

Every call gets the seed's per-phase timeouts (connect 5, read 10, write 5, pool 5 s) and,
because httpx's read timeout is per read (a server trickling one byte every 9 s never
trips it), an overall deadline per call. Nothing retries underneath the breaker: a call
is one HTTP request, and retry policy belongs to the task that made it.

What trips the breaker: timeouts, connection errors, malformed answers, and HTTP 408, 425,
429 and 5xx. Any other 4xx (400, 401, 403, 404, 422) is a request or configuration
problem: it raises ``LLMHTTPStatusError`` and counts as the provider being up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from redis.asyncio import BlockingConnectionPool, Redis

from aura import events
from aura.config import Settings, get_settings
from aura.errors import (
    LLMConnectionError,
    LLMError,
    LLMHTTPStatusError,
    LLMMalformedResponseError,
    LLMTimeoutError,
)
from aura.events import LLMOutcome, LLMRequestFinished
from aura.llm.breaker import CircuitBreaker

__all__ = ["DEFAULT_SIMULATOR_URL", "Completion", "ResilientLLMClient", "Usage", "trips_breaker"]

DEFAULT_SIMULATOR_URL = "http://127.0.0.1:8765/v1"
_MAX_ERROR_TEXT = 200


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Completion:
    """One chat completion: ``text`` is the assistant's message."""

    text: str
    model: str
    usage: Usage
    latency_s: float
    finish_reason: str | None = None
    response_id: str | None = None


def trips_breaker(exc: BaseException) -> bool:
    """True for the errors that say the provider is unwell (see the module doc)."""
    if isinstance(exc, LLMHTTPStatusError):
        return exc.transient
    return isinstance(exc, LLMError)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
    except ValueError:
        message = None
    text = str(message or response.reason_phrase or "no reason given")
    return " ".join(text.split())[:_MAX_ERROR_TEXT]


def _parse_completion(response: httpx.Response, latency_s: float) -> Completion:
    try:
        body = response.json()
        choice = body["choices"][0]
        text = choice["message"]["content"]
        if not isinstance(text, str):
            raise TypeError("message content is not a string")
        usage = body.get("usage") or {}
        return Completion(
            text=text,
            model=str(body.get("model", "")),
            usage=Usage(
                int(usage.get("prompt_tokens", 0)),
                int(usage.get("completion_tokens", 0)),
                int(usage.get("total_tokens", 0)),
            ),
            latency_s=latency_s,
            finish_reason=choice.get("finish_reason"),
            response_id=body.get("id"),
        )
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise LLMMalformedResponseError(
            f"the provider's answer is not a chat completion ({type(exc).__name__}: {exc})"
        ) from exc


_OUTCOMES: tuple[tuple[type[LLMError], LLMOutcome], ...] = (
    (LLMTimeoutError, LLMOutcome.TIMEOUT),
    (LLMConnectionError, LLMOutcome.CONNECTION_ERROR),
    (LLMHTTPStatusError, LLMOutcome.HTTP_ERROR),
    (LLMMalformedResponseError, LLMOutcome.MALFORMED),
)


class ResilientLLMClient:
    """Chat completions with timeouts, an overall deadline and a (fleet-wide) breaker.

    ``ResilientLLMClient()`` builds itself from Settings: LLM_BASE_URL (default: the
    bundled simulator on 127.0.0.1:8765), LLM_API_KEY, LLM_MODEL, the four LLM timeouts,
    LLM_CALL_DEADLINE, CIRCUIT_BREAKER_FAIL_MAX/RESET_TIMEOUT, and REDIS_URL (unset: the
    breaker is local to this process). Keyword arguments override each of them.
    """

    def __init__(
        self,
        *,
        settings: Settings | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        model: str | None = None,
        timeout: httpx.Timeout | None = None,
        deadline: float | None = None,
        fail_max: int | None = None,
        reset_timeout: float | None = None,
        redis: Redis | None = None,
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
        breaker_name: str = "llm",
    ) -> None:
        settings = settings or get_settings()
        self.base_url = (base_url or settings.llm_base_url or DEFAULT_SIMULATOR_URL).rstrip("/")
        self.model = model or settings.llm_model
        self.deadline = deadline or settings.llm_call_deadline
        key = settings.llm_api_key.get_secret_value() if api_key is None else api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http_client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=timeout
            or httpx.Timeout(
                connect=settings.llm_connect_timeout,
                read=settings.llm_read_timeout,
                write=settings.llm_write_timeout,
                pool=settings.llm_pool_timeout,
            ),
            transport=transport or _aiohttp_transport(settings),
            follow_redirects=False,
        )
        self._owned_redis: Redis | None = None
        if redis is None and settings.redis_url is not None:
            # Short socket timeouts: a sick Redis must not add seconds to an LLM call.
            # A pool that waits for a free connection (bounded) rather than failing when
            # the calls in flight outnumber it: that is back-pressure, not Redis down.
            pool = BlockingConnectionPool.from_url(
                settings.redis_url,
                max_connections=max(100, settings.worker_concurrency + 20),
                timeout=5.0,
                socket_timeout=0.5,
                socket_connect_timeout=0.5,
            )
            redis = self._owned_redis = Redis(connection_pool=pool)
        self.circuit_breaker = CircuitBreaker(
            breaker_name,
            fail_max=fail_max or settings.circuit_breaker_fail_max,
            reset_timeout=reset_timeout or settings.circuit_breaker_reset_timeout,
            redis=redis,
            clock=clock,
            is_failure=trips_breaker,
            trial_lease=self.deadline + 5.0,
        )

    async def __aenter__(self) -> ResilientLLMClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http_client.aclose()
        if self._owned_redis is not None:
            await self._owned_redis.aclose()

    async def complete(self, messages: Sequence[Mapping[str, Any]], **params: Any) -> Completion:
        """Send one chat completion; raise an ``LLMError`` or ``CircuitOpenError``."""
        if not messages:
            raise ValueError("messages must not be empty")
        body = {"model": self.model, "messages": list(messages), **params}
        return await self.circuit_breaker.call(self._request, body)

    async def _request(self, body: dict[str, Any]) -> Completion:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.deadline):
                response = await self.http_client.post("/chat/completions", json=body)
            completion = self._interpret(response, time.perf_counter() - started)
        except LLMError as exc:
            self._observe(exc, started)
            raise
        except TimeoutError as exc:  # the overall deadline
            error: LLMError = LLMTimeoutError(
                f"no complete answer within the {self.deadline:g}s deadline"
            )
            self._observe(error, started)
            raise error from exc
        except httpx.TimeoutException as exc:
            error = LLMTimeoutError(f"{type(exc).__name__} talking to the LLM provider")
            self._observe(error, started)
            raise error from exc
        except httpx.TransportError as exc:
            error = LLMConnectionError(f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_TEXT])
            self._observe(error, started)
            raise error from exc
        events.emit(LLMRequestFinished(LLMOutcome.SUCCESS, time.perf_counter() - started))
        return completion

    @staticmethod
    def _interpret(response: httpx.Response, latency_s: float) -> Completion:
        if response.is_success:
            return _parse_completion(response, latency_s)
        raise LLMHTTPStatusError(
            response.status_code, _error_text(response), retry_after=_retry_after(response)
        )

    @staticmethod
    def _observe(error: LLMError, started: float) -> None:
        outcome = next(o for kind, o in _OUTCOMES if isinstance(error, kind))
        events.emit(LLMRequestFinished(outcome, time.perf_counter() - started))


def _aiohttp_transport(settings: Settings) -> httpx.AsyncBaseTransport:
    """aiohttp's pool under httpx's API (``aura.llm.transport``), sized for a worker's
    concurrency (AsyncPool), so calls in flight never queue for a connection."""
    from aura.llm.transport import LLMTransport

    return LLMTransport(max(100, settings.worker_concurrency))
