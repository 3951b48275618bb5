"""What guards each model's calls: its breaker and its fleet-wide rate limiter.

Both are made on first use, named after the provider's host[:port] and the model
(``CIRCUIT_BREAKER_KEY`` says which part names a breaker), and bounded: at most
``MAX_BREAKERS`` per client, since models come from configuration and their names are
metric labels. The limiter is consulted only while a Redis is there and a limit is set;
a 429 is then the limiter's business, not a failure the breaker counts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis

from aura import events
from aura.errors import LLMError, LLMHTTPStatusError
from aura.events import LLMRateLimited, RateLimitOutcome
from aura.llm._policy import CallPolicy
from aura.llm._provider import HoldOff
from aura.llm.breaker import CircuitBreaker
from aura.llm.ratelimit import RateLimit, RateLimiter, estimate_tokens

__all__ = ["MAX_BREAKERS", "ModelGuards", "provider_of", "trips_breaker"]

MAX_BREAKERS = 64


def trips_breaker(exc: BaseException) -> bool:
    """True for the errors that say the provider is unwell (see aura.llm.client)."""
    if isinstance(exc, LLMHTTPStatusError):
        return exc.transient
    return isinstance(exc, LLMError)


def provider_of(base_url: str) -> str:
    """The provider part of a breaker's name: host[:port], never credentials."""
    parts = urlsplit(base_url)
    host = parts.hostname or "provider"
    return f"{host}:{parts.port}" if parts.port else host


class ModelGuards:
    """The breakers and limiters of one client's models at one provider."""

    def __init__(
        self,
        base_url: str,
        policy: CallPolicy,
        *,
        redis: Redis | None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        self._provider = provider_of(base_url)
        self._policy = policy
        self._redis = redis
        self._clock = clock
        self._sleep = sleep
        self.breakers: dict[str, CircuitBreaker] = {}
        self._breaker_of_model: dict[str, CircuitBreaker] = {}
        self._limiters: dict[str, RateLimiter] = {}
        limits = policy.limits
        self.limiting = (limits.default.enabled or bool(limits.by_model)) and redis is not None

    def breaker_name_for(self, model: str) -> str:
        provider = self._provider
        key = {"provider_model": f"{provider}/{model}", "model": model, "provider": provider}
        return f"{self._policy.breakers.name}:{key[self._policy.breakers.key]}"

    def breaker_for(self, model: str) -> CircuitBreaker:
        known = self._breaker_of_model.get(model)  # the per-call path: one dict lookup
        if known is not None:
            return known
        name = self.breaker_name_for(model)
        breaker = self.breakers.get(name)
        if breaker is None:
            if len(self.breakers) >= MAX_BREAKERS:
                raise ValueError(
                    f"more than {MAX_BREAKERS} models through one client: models must come "
                    "from configuration, not from input"
                )
            policy = self._policy.breakers
            breaker = self.breakers[name] = CircuitBreaker(
                name,
                fail_max=policy.fail_max,
                reset_timeout=policy.reset_timeout,
                failure_window=policy.failure_window,
                redis=self._redis,
                clock=self._clock,
                is_failure=self._trips_breaker,
                trial_lease=self._policy.deadline + 5.0,
            )
        if len(self._breaker_of_model) < MAX_BREAKERS:  # bounded whatever the key
            self._breaker_of_model[model] = breaker
        return breaker

    def _trips_breaker(self, exc: BaseException) -> bool:
        if isinstance(exc, LLMHTTPStatusError) and exc.status_code == 429 and self.limiting:
            return False  # the fleet's limiter holds off on it (see aura.llm.ratelimit)
        return trips_breaker(exc)

    def rate_limit_for(self, model: str) -> RateLimit:
        by_model, default = self._policy.limits.by_model, self._policy.limits.default
        own = by_model.get(f"{self._provider}/{model}") or by_model.get(model)
        if own is None:
            return default
        return dataclasses.replace(
            default,
            rpm=own.get("rpm", default.rpm),
            tpm=own.get("tpm", default.tpm),
            burst_s=own.get("burst", default.burst_s),
        )

    def limiter_for(self, model: str) -> RateLimiter:
        limiter = self._limiters.get(model)
        if limiter is None:
            self.breaker_for(model)  # the same bound on models
            limiter = self._limiters[model] = RateLimiter(
                f"{self._provider}/{model}",
                self.rate_limit_for(model),
                redis=self._redis,
                clock=self._clock,
                sleep=self._sleep,
            )
        return limiter

    async def acquire(self, model: str, body: dict[str, Any]) -> None:
        """Wait (bounded by LLM_RATE_LIMIT_MAX_WAIT) for the fleet's budget for a call, or
        raise ``LLMRateLimitedError``; nothing when no limit applies."""
        if not self.limiting:
            return
        limiter = self.limiter_for(model)
        if limiter.limit.enabled:
            tokens = estimate_tokens(body, self._policy.limits.tokens_estimate)
            await limiter.acquire(tokens, self._policy.limits.max_wait)

    async def heed_answer(
        self, model: str, status: int, hold: HoldOff | None, sent_at: float
    ) -> None:
        """A 429 (or a spent budget in the provider's rate-limit headers: ``hold``) holds
        the whole fleet off; a 429 also shrinks the fleet's adaptive share of the limit
        (aura.llm.ratelimit)."""
        throttled = status == 429
        if not self.limiting or (not throttled and hold is None):
            return
        limiter = self.limiter_for(model)
        if not limiter.limit.enabled:
            return
        if throttled:
            events.emit(LLMRateLimited(limiter.name, RateLimitOutcome.THROTTLED))
            await limiter.slow_down(sent_at)
        if hold is not None:
            await limiter.hold_off(hold.seconds, full_reset=hold.full_reset)

    async def heed_latency(self, model: str, latency_s: float, sent_at: float) -> None:
        """An answer slower than LLM_RATE_LIMIT_LATENCY: the provider is queueing."""
        if not self.limiting:
            return
        limiter = self._limiters.get(model)
        if limiter is not None and 0 < limiter.limit.latency_s < latency_s:
            await limiter.slow_down(sent_at, gently=True)
