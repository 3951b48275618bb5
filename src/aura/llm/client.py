"""``ResilientLLMClient``: OpenAI-compatible chat completions under a breaker per model.

Every call gets the seed's per-phase timeouts (connect 5, read 10, write 5, pool 5 s) and,
because a read timeout is per read (a server trickling one byte every 9 s never trips
it), an overall deadline per call. A streamed call (``stream=True``) also has a
first-token timeout: no first chunk within ``LLM_FIRST_TOKEN_TIMEOUT`` is a timeout. A
cancelled call closes its connection (the stream is left unread, so the pool drops it).
Nothing retries underneath the breaker: a call is one HTTP request, and retry policy
belongs to the task that made it.

What the breaker counts, once per call (a stream is one call):

    provider failure (counts)          not a failure (the provider is up, or nobody knows)
    ---------------------------------  ------------------------------------------------------
    timeout, deadline, first token     400, 401, 403, 404, 422 and other 4xx: the request
    connection refused / reset,        or the configuration is wrong
      also mid-stream                  the caller's cancellation (CancelledError)
    HTTP 408, 425, 429, 5xx            any answer: content, tool calls, a ``length`` cut
    an unreadable body or stream

One breaker per provider and model (``CIRCUIT_BREAKER_KEY``: ``provider_model``, or
``model``, or ``provider``), each shared fleet-wide through Redis and named
``{breaker_name}:{key}``; ``circuit_breaker`` is the one of the default model. A failing
model leaves the others' calls alone, and ``complete(..., fallback_models=[...])`` goes on
to the next model while one's breaker is open. Breakers are made on first use, at most
``MAX_BREAKERS`` per client: models come from configuration, so their names are a small
fixed set fit for metric labels.

The transport: ``http_client`` is an ``httpx.AsyncClient``; with ``LLM_HTTP_TRANSPORT=aiohttp``
(the default) it runs over aiohttp (``httpx_aiohttp``), whose pool costs a fraction of
httpx's own CPU at hundreds of calls in flight (bench/llm_transport.py), sized by
``LLM_MAX_CONNECTIONS``. aiohttp has no write timeout; connect, read and pool hold. A
non-streamed call then goes to that same aiohttp session directly, without httpx's
request and response objects on top (about 0.5 ms of CPU per call here, half the call's
cost: bench/async_worker.py); streams, and a client given a ``transport``, go through
``http_client``. Both ways map errors, timeouts and headers the same.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport
from redis.asyncio import BlockingConnectionPool, Redis

from aura import events
from aura.config import Settings, get_settings
from aura.errors import (
    CircuitOpenError,
    LLMConnectionError,
    LLMError,
    LLMHTTPStatusError,
    LLMMalformedResponseError,
    LLMTimeoutError,
)
from aura.events import (
    CircuitState,
    LLMOutcome,
    LLMRateLimited,
    LLMRequestFinished,
    RateLimitOutcome,
)
from aura.llm.breaker import CircuitBreaker
from aura.llm.protocol import Completion, StreamAssembler, Usage, parse_completion
from aura.llm.ratelimit import RateLimit, RateLimiter, estimate_tokens
from aura.logs import bounded_text

__all__ = [
    "DEFAULT_SIMULATOR_URL",
    "MAX_BREAKERS",
    "Completion",
    "ResilientLLMClient",
    "Usage",
    "provider_of",
    "trips_breaker",
]

DEFAULT_SIMULATOR_URL = "http://127.0.0.1:8765/v1"
MAX_BREAKERS = 64
_MAX_ERROR_TEXT = 200
_MAX_ERROR_BODY = 64_000

DeltaHook = Callable[[str], object]


def trips_breaker(exc: BaseException) -> bool:
    """True for the errors that say the provider is unwell (see the module doc)."""
    if isinstance(exc, LLMHTTPStatusError):
        return exc.transient
    return isinstance(exc, LLMError)


def _retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("retry-after")
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
    except (ValueError, AttributeError):
        message = None
    text = str(message or response.reason_phrase or "no reason given")
    return bounded_text(" ".join(text.split()), _MAX_ERROR_TEXT)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def provider_hold_off(headers: httpx.Headers) -> tuple[float, bool] | None:
    """How long the provider asks everyone to hold off: ``Retry-After`` seconds, else
    (when ``x-ratelimit-remaining-requests`` is 0) the request budget's full reset, in
    OpenAI's "1m30s" form; and whether it is the latter."""
    retry_after = _retry_after(headers)
    if retry_after is not None:
        return retry_after, False
    if headers.get("x-ratelimit-remaining-requests") != "0":
        return None
    parts = _DURATION_PART.findall(headers.get("x-ratelimit-reset-requests", "")[:32])
    if not parts:
        return None
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts), True


def _status_error(response: httpx.Response) -> LLMHTTPStatusError:
    return LLMHTTPStatusError(
        response.status_code, _error_text(response), retry_after=_retry_after(response.headers)
    )


def _transport_error(exc: httpx.RequestError | aiohttp.ClientError) -> LLMError:
    """httpx's error (or aiohttp's, unmapped) as ours. httpx_aiohttp maps every aiohttp
    connection error, a reset included, to ``httpx.ConnectTimeout``: its cause tells."""
    cause = exc.__cause__ if isinstance(exc, httpx.HTTPError) else exc
    if isinstance(cause, aiohttp.ClientError):
        timed_out = isinstance(cause, aiohttp.ServerTimeoutError)
    else:
        cause, timed_out = exc, isinstance(exc, httpx.TimeoutException)
    if timed_out:  # httpx's name tells the phase (ReadTimeout, ConnectTimeout, PoolTimeout)
        return LLMTimeoutError(f"{type(exc).__name__} talking to the LLM provider")
    return LLMConnectionError(bounded_text(f"{type(cause).__name__}: {cause}", _MAX_ERROR_TEXT))


def _aiohttp_error(exc: aiohttp.ClientError) -> LLMError:
    """aiohttp's error as ours, named as httpx names the phase (the direct path)."""
    if isinstance(exc, aiohttp.SocketTimeoutError):  # a read (ClientTimeout.sock_read)
        return LLMTimeoutError("ReadTimeout talking to the LLM provider")
    if isinstance(exc, aiohttp.ServerTimeoutError):  # connecting, or waiting for the pool
        return LLMTimeoutError("ConnectTimeout talking to the LLM provider")
    return LLMConnectionError(bounded_text(f"{type(exc).__name__}: {exc}", _MAX_ERROR_TEXT))


_OUTCOMES: tuple[tuple[type[LLMError], LLMOutcome], ...] = (
    (LLMTimeoutError, LLMOutcome.TIMEOUT),
    (LLMConnectionError, LLMOutcome.CONNECTION_ERROR),
    (LLMHTTPStatusError, LLMOutcome.HTTP_ERROR),
    (LLMMalformedResponseError, LLMOutcome.MALFORMED),
)


def provider_of(base_url: str) -> str:
    """The provider part of a breaker's name: host[:port], never credentials."""
    parts = urlsplit(base_url)
    host = parts.hostname or "provider"
    return f"{host}:{parts.port}" if parts.port else host


class ResilientLLMClient:
    """Chat completions with timeouts, an overall deadline and fleet-wide breakers.

    ``ResilientLLMClient()`` builds itself from Settings: LLM_BASE_URL (default: the
    bundled simulator on 127.0.0.1:8765), LLM_API_KEY, LLM_MODEL, the four LLM timeouts,
    LLM_CALL_DEADLINE, LLM_FIRST_TOKEN_TIMEOUT, LLM_HTTP_TRANSPORT, LLM_MAX_CONNECTIONS,
    CIRCUIT_BREAKER_FAIL_MAX/RESET_TIMEOUT/FAILURE_WINDOW/KEY, LLM_RATE_LIMIT_* and
    LLM_RATE_LIMITS (per model; aura.llm.ratelimit), and REDIS_URL (unset: the breakers
    are local to this process, and nothing is rate-limited). Keyword arguments override
    each of them.
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
        first_token_timeout: float | None = None,
        fail_max: int | None = None,
        reset_timeout: float | None = None,
        redis: Redis | None = None,
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
        breaker_name: str = "llm",
        rate_limit: RateLimit | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        settings = settings or get_settings()
        self.base_url = (base_url or settings.llm_base_url or DEFAULT_SIMULATOR_URL).rstrip("/")
        self.model = model or settings.llm_model
        self.deadline = deadline or settings.llm_call_deadline
        self.first_token_timeout = first_token_timeout or settings.llm_first_token_timeout
        key = settings.llm_api_key.get_secret_value() if api_key is None else api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        limits = httpx.Limits(
            max_connections=settings.llm_max_connections,
            max_keepalive_connections=settings.llm_max_connections,
        )
        self._session: aiohttp.ClientSession | None = None
        self._direct = transport is None and settings.llm_http_transport == "aiohttp"
        if self._direct:  # httpx and the direct path share one aiohttp session and pool
            transport = AiohttpTransport(limits=limits, client=self._aiohttp_session)
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
            limits=limits,
            transport=transport,
            follow_redirects=False,
        )
        self._limits = limits
        self._url = f"{self.base_url}/chat/completions"
        self._headers = {**headers, "Content-Type": "application/json"}
        phases = self.http_client.timeout  # as httpx_aiohttp maps httpx's phases
        self._aiohttp_timeout = aiohttp.ClientTimeout(
            sock_connect=phases.connect, sock_read=phases.read, connect=phases.pool
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
        self._redis = redis
        self._clock = clock
        self._breaker_name = breaker_name
        self._breaker_key = settings.circuit_breaker_key
        self._fail_max = fail_max or settings.circuit_breaker_fail_max
        self._reset_timeout = reset_timeout or settings.circuit_breaker_reset_timeout
        self._trial_wait = settings.llm_trial_wait
        self._failure_window = settings.circuit_breaker_failure_window
        self.rate_limit = rate_limit or RateLimit(
            settings.llm_rate_limit_rpm,
            settings.llm_rate_limit_tpm,
            settings.llm_rate_limit_burst,
            adaptive=settings.llm_rate_limit_adaptive,
            decrease=settings.llm_rate_limit_decrease,
            recovery_s=settings.llm_rate_limit_recovery,
            latency_s=settings.llm_rate_limit_latency,
        )
        self._rate_limits_by_model = settings.rate_limits_by_model
        self._breakers: dict[str, CircuitBreaker] = {}
        self._breaker_of_model: dict[str, CircuitBreaker] = {}
        self.circuit_breaker = self.breaker_for(self.model)
        self._rate_limit_max_wait = settings.llm_rate_limit_max_wait
        self._tokens_estimate = settings.llm_completion_tokens_estimate
        self._sleep = sleep
        self._limiters: dict[str, RateLimiter] = {}

    # -- breakers -------------------------------------------------------------------------

    def breaker_name_for(self, model: str) -> str:
        provider = provider_of(self.base_url)
        key = {"provider_model": f"{provider}/{model}", "model": model, "provider": provider}
        return f"{self._breaker_name}:{key[self._breaker_key]}"

    def breaker_for(self, model: str) -> CircuitBreaker:
        """The breaker that guards calls to ``model`` (made on first use)."""
        known = self._breaker_of_model.get(model)  # the per-call path: one dict lookup
        if known is not None:
            return known
        name = self.breaker_name_for(model)
        breaker = self._breakers.get(name)
        if breaker is None:
            if len(self._breakers) >= MAX_BREAKERS:
                raise ValueError(
                    f"more than {MAX_BREAKERS} models through one client: models must come "
                    "from configuration, not from input"
                )
            breaker = self._breakers[name] = CircuitBreaker(
                name,
                fail_max=self._fail_max,
                reset_timeout=self._reset_timeout,
                failure_window=self._failure_window,
                redis=self._redis,
                clock=self._clock,
                is_failure=self._trips_breaker,
                trial_lease=self.deadline + 5.0,
            )
        if len(self._breaker_of_model) < MAX_BREAKERS:  # bounded whatever the key
            self._breaker_of_model[model] = breaker
        return breaker

    def _trips_breaker(self, exc: BaseException) -> bool:
        if isinstance(exc, LLMHTTPStatusError) and exc.status_code == 429 and self._limiting:
            return False  # the fleet's limiter holds off on it (see aura.llm.ratelimit)
        return trips_breaker(exc)

    @property
    def _limiting(self) -> bool:
        configured = self.rate_limit.enabled or bool(self._rate_limits_by_model)
        return configured and self._redis is not None

    def rate_limit_for(self, model: str) -> RateLimit:
        """``model``'s limits at this provider: its LLM_RATE_LIMITS entry (by
        host[:port]/model, else by model), each limit it leaves out from the defaults."""
        by_model = self._rate_limits_by_model
        name = f"{provider_of(self.base_url)}/{model}"
        own = by_model.get(name) or by_model.get(model)
        if own is None:
            return self.rate_limit
        return dataclasses.replace(
            self.rate_limit,
            rpm=own.get("rpm", self.rate_limit.rpm),
            tpm=own.get("tpm", self.rate_limit.tpm),
            burst_s=own.get("burst", self.rate_limit.burst_s),
        )

    def limiter_for(self, model: str) -> RateLimiter:
        """The fleet-wide rate limiter of ``model`` at this provider (made on first use;
        models are bounded by the breakers)."""
        limiter = self._limiters.get(model)
        if limiter is None:
            self.breaker_for(model)  # the same bound on models
            limiter = self._limiters[model] = RateLimiter(
                f"{provider_of(self.base_url)}/{model}",
                self.rate_limit_for(model),
                redis=self._redis,
                clock=self._clock,
                sleep=self._sleep,
            )
        return limiter

    @property
    def breakers(self) -> dict[str, CircuitBreaker]:
        """Every breaker this client has made, by name."""
        return dict(self._breakers)

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> ResilientLLMClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http_client.aclose()
        if self._session is not None:
            await self._session.close()
        if self._owned_redis is not None:
            await self._owned_redis.aclose()

    def _aiohttp_session(self) -> aiohttp.ClientSession:
        """The one aiohttp session (made on first use, inside the loop that uses it)."""
        if self._session is None:
            limit = self._limits.max_connections or 0
            connector = aiohttp.TCPConnector(
                limit=limit, keepalive_timeout=self._limits.keepalive_expiry
            )
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    # -- calls ----------------------------------------------------------------------------

    async def complete(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        model: str | None = None,
        fallback_models: Sequence[str] = (),
        stream: bool = False,
        on_delta: DeltaHook | None = None,
        **params: Any,
    ) -> Completion:
        """Send one chat completion; raise an ``LLMError`` or ``CircuitOpenError``.

        ``params`` go into the request body as they are (``temperature``, ``max_tokens``,
        ``n``, ``tools``, ``tool_choice``, ``response_format``, ...). ``stream=True``
        streams the answer (``on_delta`` gets the first choice's content as it comes) and
        returns the same ``Completion``. While ``model``'s breaker is open the call goes
        to the next of ``fallback_models``; when every one is open, ``CircuitOpenError``
        with the soonest ``retry_after``. ``Completion.model`` says who answered.
        """
        if not messages:
            raise ValueError("messages must not be empty")
        candidates = [model or self.model, *fallback_models]
        refused: CircuitOpenError | None = None
        for candidate in candidates:
            body = {"model": candidate, "messages": list(messages), **params}
            breaker = self.breaker_for(candidate)
            try:
                if self._limiting and breaker.state is CircuitState.CLOSED:
                    limiter = self.limiter_for(candidate)
                    if limiter.limit.enabled:
                        tokens = estimate_tokens(body, self._tokens_estimate)
                        await limiter.acquire(tokens, self._rate_limit_max_wait)
                try:
                    return await self._call(breaker, body, stream, on_delta)
                except CircuitOpenError:
                    # A trial is running: its outcome is a second or so away, not the
                    # trial's lease. Wait for it (bounded), and go on if it closed.
                    if breaker.state is not CircuitState.HALF_OPEN or not (
                        await breaker.wait_for_trial(self._trial_wait)
                    ):
                        raise
                    return await self._call(breaker, body, stream, on_delta)
            except CircuitOpenError as exc:
                if refused is None or exc.retry_after < refused.retry_after:
                    refused = exc
        assert refused is not None
        raise refused

    async def _call(
        self,
        breaker: CircuitBreaker,
        body: dict[str, Any],
        stream: bool,
        on_delta: DeltaHook | None,
    ) -> Completion:
        if stream:
            return await breaker.call(self._stream, body, on_delta)
        return await breaker.call(self._request, body)

    async def _request(self, body: dict[str, Any]) -> Completion:
        started = time.perf_counter()
        sent_at = self._clock()
        try:
            try:
                async with asyncio.timeout(self.deadline):
                    if self._direct:
                        response = None
                        status, headers, content, reason = await self._post_direct(body)
                    else:
                        response = await self.http_client.post("/chat/completions", json=body)
                        status, headers, content = (
                            response.status_code,
                            response.headers,
                            response.content,
                        )
            except aiohttp.ClientError as exc:  # before TimeoutError: its timeouts are both
                raise _aiohttp_error(exc) if self._direct else _transport_error(exc) from exc
            except TimeoutError as exc:
                raise LLMTimeoutError(
                    f"no complete answer within the {self.deadline:g}s deadline"
                ) from exc
            except httpx.RequestError as exc:
                raise _transport_error(exc) from exc
            await self._heed_provider(body["model"], status, headers, sent_at)
            if not 200 <= status < 300:
                if response is None:  # the direct path: its error text is read as httpx's
                    extensions = {"reason_phrase": reason.encode()} if reason else None
                    response = httpx.Response(
                        status, headers=headers, content=content, extensions=extensions
                    )
                raise _status_error(response)
            completion = parse_completion(content, time.perf_counter() - started)
        except LLMError as exc:
            self._observe(exc, started, body["model"])
            raise
        self._observe_success(completion, started, body["model"])
        await self._heed_latency(body["model"], completion.latency_s, sent_at)
        return completion

    async def _post_direct(self, body: dict[str, Any]) -> tuple[int, Any, bytes, str | None]:
        """POST the body on the aiohttp session: status, headers (case-insensitive), body,
        reason. Encoded as httpx encodes ``json=`` (compact, UTF-8, NaN refused)."""
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        async with self._aiohttp_session().post(
            self._url,
            data=data.encode(),
            headers=self._headers,
            timeout=self._aiohttp_timeout,
            allow_redirects=False,
        ) as response:
            return response.status, response.headers, await response.read(), response.reason

    async def _stream(self, body: dict[str, Any], on_delta: DeltaHook | None) -> Completion:
        started = time.perf_counter()
        sent_at = self._clock()
        first_token_s = 0.0
        loop = asyncio.get_running_loop()
        deadline_at = loop.time() + self.deadline
        first_at = loop.time() + min(self.first_token_timeout, self.deadline)
        assembler = StreamAssembler()
        body = {**body, "stream": True}
        body.setdefault("stream_options", {"include_usage": True})
        try:
            try:
                async with (
                    asyncio.timeout_at(first_at) as limit,
                    self.http_client.stream("POST", "/chat/completions", json=body) as response,
                ):
                    await self._heed_provider(
                        body["model"], response.status_code, response.headers, sent_at
                    )
                    if not response.is_success:
                        await response.aread()
                        raise _status_error(response)
                    async for text in response.aiter_text():
                        deltas = assembler.feed(text)
                        if assembler.chunks and limit.when() != deadline_at:
                            limit.reschedule(deadline_at)  # the first token came in time
                            first_token_s = time.perf_counter() - started
                        if on_delta is not None:
                            for delta in deltas:
                                on_delta(delta)
                        if assembler.done:
                            break
            except TimeoutError as exc:
                what = "first token" if not assembler.chunks else "complete answer"
                limit_s = self.first_token_timeout if not assembler.chunks else self.deadline
                raise LLMTimeoutError(f"no {what} within {limit_s:g}s") from exc
            except (httpx.RequestError, aiohttp.ClientError) as exc:
                raise _transport_error(exc) from exc
            completion = assembler.result(time.perf_counter() - started)
        except LLMError as exc:
            self._observe(exc, started, body["model"])
            raise
        self._observe_success(completion, started, body["model"])
        await self._heed_latency(body["model"], first_token_s, sent_at)  # queueing shows there
        return completion

    async def _heed_provider(self, model: str, status: int, headers: Any, sent_at: float) -> None:
        """A 429 (or a spent budget in x-ratelimit-*) holds the whole fleet off; a 429
        also shrinks the fleet's adaptive share of the limit (aura.llm.ratelimit).
        ``headers``: httpx's or aiohttp's, both looked up without regard to case."""
        if not self._limiting:
            return
        throttled = status == 429
        if throttled or "x-ratelimit-remaining-requests" in headers:
            limiter = self.limiter_for(model)
            if not limiter.limit.enabled:
                return
            if throttled:
                events.emit(LLMRateLimited(limiter.name, RateLimitOutcome.THROTTLED))
                await limiter.slow_down(sent_at)
            hold = provider_hold_off(headers)
            if hold is not None:
                await limiter.hold_off(hold[0], full_reset=hold[1])

    async def _heed_latency(self, model: str, latency_s: float, sent_at: float) -> None:
        """An answer slower than LLM_RATE_LIMIT_LATENCY: the provider is queueing."""
        if not self._limiting:
            return
        limiter = self._limiters.get(model)
        if limiter is not None and 0 < limiter.limit.latency_s < latency_s:
            await limiter.slow_down(sent_at, gently=True)

    @staticmethod
    def _observe(error: LLMError, started: float, model: str) -> None:
        outcome = next(o for kind, o in _OUTCOMES if isinstance(error, kind))
        events.emit(LLMRequestFinished(outcome, time.perf_counter() - started, model))

    @staticmethod
    def _observe_success(completion: Completion, started: float, model: str) -> None:
        usage = completion.usage
        events.emit(
            LLMRequestFinished(
                LLMOutcome.SUCCESS,
                time.perf_counter() - started,
                model,
                usage.prompt_tokens,
                usage.completion_tokens,
            )
        )
