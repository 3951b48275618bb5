"""What a ``ResilientLLMClient`` does around each call, as data, and how Settings build it.

``CallPolicy`` holds the default model, the call's deadlines, the breakers' policy
(``BreakerPolicy``) and the fleet's rate limits (``LimitPolicy``); ``build_parts`` turns
Settings plus a caller's overrides into a provider, a wire and a policy. An override of
``None`` means "from Settings"; any other value, 0 included, is taken as given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, TypedDict, TypeVar

import httpx
from redis.asyncio import Redis

from aura.config import Settings
from aura.errors import ConfigurationError
from aura.llm._provider import Provider
from aura.llm._providers import PROVIDERS
from aura.llm._wire import AiohttpWire, HttpxWire, Wire
from aura.llm.ratelimit import RateLimit
from aura.redis_connect import async_redis

__all__ = [
    "DEFAULT_SIMULATOR_URL",
    "BreakerPolicy",
    "CallPolicy",
    "LimitPolicy",
    "Overrides",
    "build_parts",
    "build_policy",
    "build_provider",
    "build_wire",
    "redis_from_settings",
]

DEFAULT_SIMULATOR_URL = "http://127.0.0.1:8765/v1"
BreakerKey = Literal["provider_model", "model", "provider"]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """The breakers' shape: named ``{name}:{key}`` (key: CIRCUIT_BREAKER_KEY)."""

    name: str = "llm"
    key: BreakerKey = "provider_model"
    fail_max: int = 3
    reset_timeout: float = 60.0
    failure_window: float = 60.0
    trial_wait: float = 5.0  # a call refused while the trial runs waits this for it


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    """The fleet's rate limits: ``default`` for every model, ``by_model`` over it."""

    default: RateLimit = field(default_factory=RateLimit)
    by_model: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    max_wait: float = 10.0  # longer: LLMRateLimitedError (the task defers)
    tokens_estimate: int = 512  # charged for the answer when max_tokens is unset


@dataclass(frozen=True, slots=True)
class CallPolicy:
    model: str = "gpt-4o-mini"
    deadline: float = 30.0  # the whole call; the read timeout is per read
    first_token_timeout: float = 10.0  # streams: until the first chunk
    breakers: BreakerPolicy = field(default_factory=BreakerPolicy)
    limits: LimitPolicy = field(default_factory=LimitPolicy)


class Overrides(TypedDict, total=False):
    """``ResilientLLMClient.from_settings`` keywords over Settings (None: the setting)."""

    provider: Provider | None
    base_url: str | None
    api_key: str | None
    model: str | None
    timeout: httpx.Timeout | None
    deadline: float | None
    first_token_timeout: float | None
    fail_max: int | None
    reset_timeout: float | None
    transport: httpx.AsyncBaseTransport | None
    breaker_name: str
    rate_limit: RateLimit | None


def _given(value: T | None, default: T) -> T:
    return value if value is not None else default


def build_provider(settings: Settings, options: Overrides) -> Provider:
    given = options.get("provider")
    if given is not None:
        return given
    factory = PROVIDERS.get(settings.llm_provider)
    if factory is None:
        known = ", ".join(sorted(PROVIDERS))
        raise ConfigurationError(f"LLM_PROVIDER={settings.llm_provider!r}: one of {known}")
    url = _given(options.get("base_url"), settings.llm_base_url or DEFAULT_SIMULATOR_URL)
    key = _given(options.get("api_key"), settings.llm_api_key.get_secret_value())
    return factory(url.rstrip("/"), key)


def build_wire(settings: Settings, provider: Provider, options: Overrides) -> Wire:
    timeout = _given(
        options.get("timeout"),
        httpx.Timeout(
            connect=settings.llm_connect_timeout,
            read=settings.llm_read_timeout,
            write=settings.llm_write_timeout,
            pool=settings.llm_pool_timeout,
        ),
    )
    transport = options.get("transport")
    size = settings.llm_max_connections
    if transport is None and settings.llm_http_transport == "aiohttp":
        return AiohttpWire(
            provider.base_url, provider.headers, timeout=timeout, max_connections=size
        )
    return HttpxWire(
        provider.base_url,
        provider.headers,
        timeout=timeout,
        max_connections=size,
        transport=transport,
    )


def build_policy(settings: Settings, options: Overrides) -> CallPolicy:
    breakers = BreakerPolicy(
        name=options.get("breaker_name", "llm"),
        key=settings.circuit_breaker_key,
        fail_max=_given(options.get("fail_max"), settings.circuit_breaker_fail_max),
        reset_timeout=_given(options.get("reset_timeout"), settings.circuit_breaker_reset_timeout),
        failure_window=settings.circuit_breaker_failure_window,
        trial_wait=settings.llm_trial_wait,
    )
    default = RateLimit(
        settings.llm_rate_limit_rpm,
        settings.llm_rate_limit_tpm,
        settings.llm_rate_limit_burst,
        adaptive=settings.llm_rate_limit_adaptive,
        decrease=settings.llm_rate_limit_decrease,
        recovery_s=settings.llm_rate_limit_recovery,
        latency_s=settings.llm_rate_limit_latency,
    )
    limits = LimitPolicy(
        default=_given(options.get("rate_limit"), default),
        by_model=settings.rate_limits_by_model,
        max_wait=settings.llm_rate_limit_max_wait,
        tokens_estimate=settings.llm_completion_tokens_estimate,
    )
    return CallPolicy(
        model=_given(options.get("model"), settings.llm_model),
        deadline=_given(options.get("deadline"), settings.llm_call_deadline),
        first_token_timeout=_given(
            options.get("first_token_timeout"), settings.llm_first_token_timeout
        ),
        breakers=breakers,
        limits=limits,
    )


def build_parts(settings: Settings, options: Overrides) -> tuple[Provider, Wire, CallPolicy]:
    """The provider (LLM_PROVIDER), the wire (LLM_HTTP_TRANSPORT) and the policy."""
    provider = build_provider(settings, options)
    return provider, build_wire(settings, provider, options), build_policy(settings, options)


def redis_from_settings(settings: Settings) -> Redis | None:
    """The client's own Redis (REDIS_URL) when none is given: short socket timeouts (a
    sick Redis must not add seconds to an LLM call), and a pool that waits, bounded, for
    a free connection when the calls in flight outnumber it (back-pressure, not down)."""
    if settings.redis_url is None:
        return None
    return async_redis(
        settings.redis_url,
        max_connections=max(100, settings.worker_concurrency + 20),
        pool_timeout=5.0,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
    )
