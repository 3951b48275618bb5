"""``ResilientLLMClient``: chat completions from a provider, under a breaker per model.

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

The provider and the wire. What goes on the wire and how an answer or an error reads is
the provider's (``Provider``: ``LLM_PROVIDER=openai``, the default, or ``anthropic``);
how it is sent is the wire's (``aura.llm._wire``: one aiohttp session by default, the
measured fastest at hundreds of calls in flight; httpx's own pool with
``LLM_HTTP_TRANSPORT=httpx`` or a given httpx ``transport``). ``http_client`` is an
``httpx.AsyncClient`` on the same pool either way. Both wires' errors, timeouts and headers
are read by one mapping. ``ResilientLLMClient(provider, wire=..., policy=..., redis=...)``
takes the parts; ``from_settings`` (or the constructor with parts left out) builds them.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Unpack

import httpx
from redis.asyncio import Redis

from aura import tracing
from aura.config import Settings, get_settings
from aura.errors import CircuitOpenError, LLMError, LLMTimeoutError
from aura.events import CircuitState
from aura.llm._guards import MAX_BREAKERS, ModelGuards, provider_of, trips_breaker
from aura.llm._observe import observe_failure, observe_success, traced_call
from aura.llm._openai import provider_hold_off as provider_hold_off
from aura.llm._policy import (
    DEFAULT_SIMULATOR_URL,
    CallPolicy,
    Overrides,
    build_parts,
    build_policy,
    build_provider,
    build_wire,
)
from aura.llm._policy import redis_from_settings as _redis_from_settings
from aura.llm._provider import Provider, ProviderRequest, error_text
from aura.llm._wire import WIRE_ERRORS, Wire, encode, transport_error
from aura.llm.breaker import CircuitBreaker
from aura.llm.budgets import TenantBudgets
from aura.llm.protocol import Completion, Usage
from aura.llm.ratelimit import RateLimit, RateLimiter

__all__ = [
    "DEFAULT_SIMULATOR_URL",
    "MAX_BREAKERS",
    "Completion",
    "ResilientLLMClient",
    "Usage",
    "provider_of",
    "trips_breaker",
]

DeltaHook = Callable[[str], object]


def _error_text(response: httpx.Response) -> str:
    """An error answer's text as the client shows it (the provider's message, bounded)."""
    return error_text(response.content, response.reason_phrase)


class ResilientLLMClient:
    """Chat completions with timeouts, an overall deadline and fleet-wide breakers.

    ``ResilientLLMClient(provider, wire=..., policy=..., redis=...)`` takes its parts and
    reads no Settings. Parts left out (``ResilientLLMClient()``) come from ``settings``
    (default: ``get_settings()``), as ``from_settings`` builds them: LLM_PROVIDER,
    LLM_BASE_URL (default: the bundled simulator on 127.0.0.1:8765), LLM_API_KEY,
    LLM_MODEL, the four LLM timeouts, LLM_CALL_DEADLINE, LLM_FIRST_TOKEN_TIMEOUT,
    LLM_HTTP_TRANSPORT, LLM_MAX_CONNECTIONS, CIRCUIT_BREAKER_FAIL_MAX/RESET_TIMEOUT/
    FAILURE_WINDOW/KEY, LLM_RATE_LIMIT_* and LLM_RATE_LIMITS (per model;
    aura.llm.ratelimit), LLM_TENANT_BUDGET* (``budgets``: aura.llm.budgets) and REDIS_URL:
    with no ``redis`` given, the client opens a pool of its own there (closed by
    ``aclose``); with neither, the breakers are local to this process and nothing is
    rate-limited or budgeted.
    """

    def __init__(
        self,
        provider: Provider | None = None,
        *,
        wire: Wire | None = None,
        policy: CallPolicy | None = None,
        redis: Redis | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        settings: Settings | None = None,
        budgets: TenantBudgets | None = None,
    ) -> None:
        if provider is None or wire is None or policy is None:
            settings = settings if settings is not None else get_settings()
            provider = provider or build_provider(settings, {})
            wire = wire or build_wire(settings, provider, {})
            policy = policy or build_policy(settings, {})
        self.provider = provider
        self.policy = policy
        self._wire = wire
        self._owned_redis: Redis | None = None
        if redis is None and settings is not None:
            redis = self._owned_redis = _redis_from_settings(settings)
        self._redis = redis
        self._clock = clock
        self._sleep = sleep
        self._guards = ModelGuards(provider.base_url, policy, redis=redis, clock=clock, sleep=sleep)
        self.circuit_breaker = self.breaker_for(self.model)
        if budgets is None:  # a call may reach the provider up to its rate-limit wait late
            late = 1.0 + (policy.limits.max_wait if self._guards.limiting else 0.0)
            budgets = TenantBudgets(redis=None)
            if settings is not None:
                budgets = TenantBudgets.from_settings(settings, redis=redis, allowance_s=late)
        self.budgets = budgets

    @classmethod
    def from_settings(
        cls,
        settings: Settings | None = None,
        *,
        redis: Redis | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        budgets: TenantBudgets | None = None,
        **overrides: Unpack[Overrides],
    ) -> ResilientLLMClient:
        """A client built from ``settings`` (default: ``get_settings()``), each keyword
        given (``base_url``, ``api_key``, ``model``, ``timeout``, ``deadline``,
        ``first_token_timeout``, ``fail_max``, ``reset_timeout``, ``transport``,
        ``breaker_name``, ``rate_limit``, ``provider``, ``budgets``) over its setting; 0
        is a value."""
        settings = settings if settings is not None else get_settings()
        provider, wire, policy = build_parts(settings, overrides)
        return cls(
            provider,
            wire=wire,
            policy=policy,
            redis=redis,
            clock=clock,
            sleep=sleep,
            settings=settings,
            budgets=budgets,
        )

    @property
    def base_url(self) -> str:
        return self.provider.base_url

    @property
    def model(self) -> str:
        """The model called when ``complete`` names none."""
        return self.policy.model

    @property
    def deadline(self) -> float:
        return self.policy.deadline

    @property
    def first_token_timeout(self) -> float:
        return self.policy.first_token_timeout

    @property
    def rate_limit(self) -> RateLimit:
        """The limits of every model without an LLM_RATE_LIMITS entry of its own."""
        return self.policy.limits.default

    @property
    def http_client(self) -> httpx.AsyncClient:
        """The seed's ``httpx.AsyncClient``, on the wire's pool (base URL, headers set)."""
        return self._wire.http_client

    # -- breakers and limiters, per model (aura.llm._guards) ------------------------------

    def breaker_name_for(self, model: str) -> str:
        return self._guards.breaker_name_for(model)

    def breaker_for(self, model: str) -> CircuitBreaker:
        """The breaker that guards calls to ``model`` (made on first use)."""
        return self._guards.breaker_for(model)

    def rate_limit_for(self, model: str) -> RateLimit:
        """``model``'s limits at this provider: its LLM_RATE_LIMITS entry (by
        host[:port]/model, else by model), each limit it leaves out from the defaults."""
        return self._guards.rate_limit_for(model)

    def limiter_for(self, model: str) -> RateLimiter:
        """The fleet-wide rate limiter of ``model`` at this provider (made on first use)."""
        return self._guards.limiter_for(model)

    @property
    def breakers(self) -> dict[str, CircuitBreaker]:
        """Every breaker this client has made, by name."""
        return dict(self._guards.breakers)

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> ResilientLLMClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.budgets.aclose()
        await self._wire.aclose()
        if self._owned_redis is not None:
            await self._owned_redis.aclose()

    # -- calls ----------------------------------------------------------------------------

    async def complete(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        model: str | None = None,
        fallback_models: Sequence[str] = (),
        stream: bool = False,
        on_delta: DeltaHook | None = None,
        tenant: str | None = None,
        **params: Any,
    ) -> Completion:
        """Send one chat completion; raise an ``LLMError`` or ``CircuitOpenError``.

        ``params`` go into the request body as they are (``temperature``, ``max_tokens``,
        ``n``, ``tools``, ``tool_choice``, ``response_format``, ...). ``stream=True``
        streams the answer (``on_delta`` gets the first choice's content as it comes) and
        returns the same ``Completion``. While ``model``'s breaker is open the call goes
        to the next of ``fallback_models``; when every one is open, ``CircuitOpenError``
        with the soonest ``retry_after``. ``Completion.model`` says who answered. The call
        spends ``tenant``'s token budget (default: the tenant of the delivery being run;
        ``aura.llm.budgets``): over it, ``LLMBudgetExceededError`` and no call.
        """
        if not messages:
            raise ValueError("messages must not be empty")
        candidates = [model or self.model, *fallback_models]
        if not self.budgets.enabled:
            return await self._first_open(candidates, messages, params, stream, on_delta, None)
        return await self.budgets.around(
            tenant,
            {"messages": messages, **params},
            lambda by: self._first_open(candidates, messages, params, stream, on_delta, by),
        )

    async def _first_open(
        self,
        candidates: Sequence[str],
        messages: Sequence[Mapping[str, Any]],
        params: Mapping[str, Any],
        stream: bool,
        on_delta: DeltaHook | None,
        send_by: float | None,
    ) -> Completion:
        """The first candidate model whose breaker lets the call through answers it."""
        refused: CircuitOpenError | None = None
        for candidate in candidates:
            request = self.provider.request(candidate, messages, params, stream=stream)
            try:
                if tracing.enabled():  # a span per model tried (aura.tracing)
                    call = functools.partial(
                        self._guarded, candidate, request, stream, on_delta, send_by
                    )
                    name, url = self.provider.name, self.base_url
                    return await traced_call(call, candidate, name, url, messages)
                return await self._guarded(candidate, request, stream, on_delta, send_by)
            except CircuitOpenError as exc:
                if refused is None or exc.retry_after < refused.retry_after:
                    refused = exc
        assert refused is not None
        raise refused

    async def _guarded(
        self,
        model: str,
        request: ProviderRequest,
        stream: bool,
        on_delta: DeltaHook | None,
        send_by: float | None = None,
    ) -> Completion:
        """One model's call: the fleet's limiter, then the breaker (waiting, bounded, for
        a running trial's outcome rather than its lease, unless that would send the call
        past ``send_by``, its budget's allowance)."""
        breaker = self._guards.breaker_for(model)
        if breaker.state is CircuitState.CLOSED:
            await self._guards.acquire(model, request.body)
        call = self._stream if stream else self._request
        try:
            return await breaker.call(call, model, request, on_delta)
        except CircuitOpenError:
            # A trial is running: its outcome is a second or so away, not the trial's
            # lease. Wait for it (bounded), and go on if it closed.
            if breaker.state is not CircuitState.HALF_OPEN or not (
                await breaker.wait_for_trial(self.policy.breakers.trial_wait)
            ):
                raise
            if send_by is not None and asyncio.get_running_loop().time() > send_by:
                raise
            return await breaker.call(call, model, request, on_delta)

    async def _request(
        self, model: str, request: ProviderRequest, _: DeltaHook | None = None
    ) -> Completion:
        started = time.perf_counter()
        sent_at = self._clock()
        try:
            try:
                async with asyncio.timeout(self.deadline):
                    answer = await self._wire.post(request.path, encode(request.body))
            except WIRE_ERRORS as exc:  # before TimeoutError: aiohttp's timeouts are both
                raise transport_error(exc) from exc
            except TimeoutError as exc:
                raise LLMTimeoutError(
                    f"no complete answer within the {self.deadline:g}s deadline"
                ) from exc
            status, headers = answer.status, answer.headers
            await self._heed_answer(model, status, headers, sent_at)
            if not 200 <= status < 300:
                raise self.provider.error(status, headers, answer.content, answer.reason)
            completion = self.provider.parse(answer.content, time.perf_counter() - started)
        except LLMError as exc:
            observe_failure(exc, started, model)
            raise
        observe_success(completion, started, model)
        await self._guards.heed_latency(model, completion.latency_s, sent_at)
        return completion

    async def _stream(
        self, model: str, request: ProviderRequest, on_delta: DeltaHook | None
    ) -> Completion:
        started = time.perf_counter()
        sent_at = self._clock()
        first_token_s = 0.0
        loop = asyncio.get_running_loop()
        deadline_at = loop.time() + self.deadline
        first_at = loop.time() + min(self.first_token_timeout, self.deadline)
        parser = self.provider.stream_parser()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            try:
                async with (
                    asyncio.timeout_at(first_at) as limit,
                    self._wire.stream(request.path, encode(request.body)) as reply,
                ):
                    await self._heed_answer(model, reply.status, reply.headers, sent_at)
                    if not 200 <= reply.status < 300:
                        body = await reply.read()
                        raise self.provider.error(reply.status, reply.headers, body, reply.reason)
                    async for chunk in reply.body:
                        deltas = parser.feed(decoder.decode(chunk))
                        if parser.chunks and limit.when() != deadline_at:
                            limit.reschedule(deadline_at)  # the first token came in time
                            first_token_s = time.perf_counter() - started
                        if on_delta is not None:
                            for delta in deltas:
                                on_delta(delta)
                        if parser.done:
                            break
            except WIRE_ERRORS as exc:
                raise transport_error(exc) from exc
            except TimeoutError as exc:
                what = "first token" if not parser.chunks else "complete answer"
                limit_s = self.first_token_timeout if not parser.chunks else self.deadline
                raise LLMTimeoutError(f"no {what} within {limit_s:g}s") from exc
            parser.feed(decoder.decode(b"", final=True))
            completion = parser.result(time.perf_counter() - started)
        except LLMError as exc:
            observe_failure(exc, started, model)
            raise
        observe_success(completion, started, model)
        await self._guards.heed_latency(model, first_token_s, sent_at)  # queueing shows there
        return completion

    async def _heed_answer(
        self, model: str, status: int, headers: Mapping[str, str], sent_at: float
    ) -> None:
        if self._guards.limiting:  # the headers are read only when someone heeds them
            hold = self.provider.hold_off(status, headers)
            await self._guards.heed_answer(model, status, hold, sent_at)
