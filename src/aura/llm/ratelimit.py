"""Fleet-wide rate limits for LLM calls: requests and tokens per minute, per provider and
model, kept in Redis, one round trip per call.

The algorithm is GCRA (the generic cell rate algorithm, as in redis-cell and
go-redis/redis_rate), chosen over a sliding window because its whole state is one number
per limit (the theoretical arrival time, TAT), it spreads calls evenly instead of letting
a window's budget go in its first second (a burst that providers answer with 429s), and
it can *reserve*: a call that may go in ``w`` seconds takes its slot now and sleeps ``w``,
so it never comes back for a second round trip. One Lua script checks the request limit
and the token limit together and reserves both or neither.

    allowed, wait = one EVALSHA
    wait <= the time the caller may wait (its deadline)  ->  slot reserved; sleep wait; call
    otherwise                                            ->  nothing reserved;
                                                             ``LLMRateLimitedError``

``LLMRateLimitedError`` is a ``CircuitOpenError``: a task is deferred on it exactly as on an
open breaker, spending no retry budget. Tokens are charged before the call, estimated
(prompt characters / 4 + ``max_tokens``, or ``default_completion_tokens``): the limiter
never learns the real count, so keep the estimate on the generous side.

The provider's word wins: a 429's ``Retry-After`` (or ``x-ratelimit-remaining-requests: 0``
with ``x-ratelimit-reset-requests``) pushes the limit's TAT past that moment, so the whole
fleet holds off (``hold_off``, one more round trip, only on those answers).

Keep ``burst_s`` below the provider's own burst tolerance: calls reach the provider with
jitter (a slot's call may arrive after the next one's), and the difference absorbs it.
A 429 is the limiter's business while it is on: it holds the fleet off and does not count
toward the breaker (a storm of 5xx, timeouts and resets still does).

Failure accepted: a reserved slot whose call is then cancelled is wasted (the fleet runs a
little under the limit, never over). If Redis cannot be reached, calls go unlimited (the
provider's 429s and the breaker still guard), logged once.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from redis.asyncio import Redis

from aura.errors import CircuitOpenError
from aura.redis_errors import REDIS_UNREACHABLE

__all__ = ["KEY_PREFIX", "LLMRateLimitedError", "RateLimit", "RateLimiter", "estimate_tokens"]

KEY_PREFIX = "aura:llm_rate:"
# Round trips in flight per limiter: hundreds of calls would otherwise fill redis-py's
# pool (MaxConnectionsError, which is back-pressure, not an unreachable Redis)
_MAX_CONCURRENT_ROUND_TRIPS = 32
_log = structlog.get_logger("aura.llm.ratelimit")

# KEYS: request TAT, token TAT. ARGV: now, request interval, token interval, tokens,
# request burst window, token burst window, max wait (all seconds but tokens).
# An interval of 0 means no limit of that kind.
_GCRA = """
local now = tonumber(ARGV[1])
local max_wait = tonumber(ARGV[7])
local wait, tats = 0, {}
for i = 1, 2 do
  local interval = tonumber(ARGV[1 + i])
  if interval > 0 then
    local cost = interval * (i == 1 and 1 or tonumber(ARGV[4]))
    local tat = math.max(tonumber(redis.call('GET', KEYS[i]) or now), now)
    local new_tat = tat + cost
    local allow_at = new_tat - tonumber(ARGV[4 + i])
    wait = math.max(wait, allow_at - now)
    tats[i] = new_tat
  end
end
-- %.17g: Lua's tostring keeps 14 digits, a tenth of a millisecond of an epoch time
if wait > max_wait then
  return {0, string.format('%.17g', wait)}
end
for i = 1, 2 do
  if tats[i] then
    local ttl = math.ceil((tats[i] - now) * 1000) + 1000
    redis.call('SET', KEYS[i], string.format('%.17g', tats[i]), 'PX', ttl)
  end
end
return {1, string.format('%.17g', wait)}
"""

# KEYS: request TAT, token TAT. ARGV: now, then the new TAT of each (0: leave it).
_HOLD_OFF = """
local now = tonumber(ARGV[1])
for i = 1, 2 do
  local wanted = tonumber(ARGV[1 + i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or 0)
  if wanted > tat then
    redis.call('SET', KEYS[i], ARGV[1 + i], 'PX', math.ceil((wanted - now) * 1000) + 1000)
  end
end
return 1
"""


class LLMRateLimitedError(CircuitOpenError):
    """The fleet's budget for this provider and model is spent for longer than the call
    may wait; ``retry_after`` says when a slot frees. Deferred like an open breaker."""

    def __str__(self) -> str:
        return f"rate limit {self.name!r} reached; a slot frees in {self.retry_after:.1f}s"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Requests and tokens per minute (0: no limit of that kind); ``burst_s``: how many
    seconds' worth of budget may go at once."""

    rpm: float = 0.0
    tpm: float = 0.0
    burst_s: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.rpm > 0 or self.tpm > 0


def estimate_tokens(body: dict[str, Any], default_completion_tokens: int) -> int:
    """Tokens a call will use, guessed before it is made (see the module doc)."""
    prompt = sum(len(str(message.get("content") or "")) for message in body["messages"]) // 4
    completion = body.get("max_completion_tokens") or body.get("max_tokens")
    n = body.get("n") or 1
    return prompt + int(completion or default_completion_tokens) * int(n)


class RateLimiter:
    """The fleet's limits for one provider and model (``name``), shared through Redis."""

    def __init__(
        self,
        name: str,
        limit: RateLimit,
        *,
        redis: Redis | None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.name = name
        self.limit = limit
        self._redis = redis
        self._clock = clock
        self._sleep = sleep
        self._keys = [f"{KEY_PREFIX}{name}:requests", f"{KEY_PREFIX}{name}:tokens"]
        self._request_interval = 60.0 / limit.rpm if limit.rpm > 0 else 0.0
        self._token_interval = 60.0 / limit.tpm if limit.tpm > 0 else 0.0
        self._request_window = self._request_interval * max(limit.rpm / 60.0 * limit.burst_s, 1)
        self._gcra = redis.register_script(_GCRA) if redis is not None else None
        self._hold = redis.register_script(_HOLD_OFF) if redis is not None else None
        self._redis_down = False
        self._round_trips = asyncio.Semaphore(_MAX_CONCURRENT_ROUND_TRIPS)

    async def acquire(self, tokens: int, max_wait: float) -> float:
        """Reserve a slot for one call of ``tokens``; sleep until it comes and return the
        seconds waited, or raise ``LLMRateLimitedError`` (nothing reserved) when the slot
        is more than ``max_wait`` away. One Redis round trip."""
        if self._gcra is None or not self.limit.enabled:
            return 0.0
        try:
            async with self._round_trips:
                now = self._clock()  # read once the round trip may start: never stale
                args = [
                    repr(now),
                    repr(self._request_interval),
                    repr(self._token_interval),
                    str(max(tokens, 1)),
                    repr(self._request_window),
                    repr(
                        self._token_interval
                        * max(self.limit.tpm / 60.0 * self.limit.burst_s, tokens)
                    ),
                    repr(max(max_wait, 0.0)),
                ]
                allowed, wait_text = await self._gcra(keys=self._keys, args=args)
        except REDIS_UNREACHABLE as exc:
            self._unreachable(exc)
            return 0.0
        self._redis_down = False
        wait = max(float(wait_text), 0.0)
        if not int(allowed):
            raise LLMRateLimitedError(self.name, wait)
        if wait > 0:
            await self._sleep(wait)
        return wait

    async def hold_off(self, seconds: float, *, full_reset: bool = False) -> None:
        """The provider said "no call before ``seconds`` from now" (Retry-After): the
        fleet holds off that long. With ``full_reset`` it said "your request budget is
        spent; whole again in ``seconds``": its burst is not ours, so the fleet only
        paces, its next call one interval away."""
        if self._hold is None or seconds <= 0 or not math.isfinite(seconds):
            return
        now = self._clock()
        if full_reset:
            tats = [now + min(seconds, self._request_window), 0.0]
        else:  # the next slot opens a burst window before the TAT: push it past ``seconds``
            tats = [
                now + seconds + window - interval if interval else 0.0
                for interval, window in (
                    (self._request_interval, self._request_window),
                    (self._token_interval, self._token_interval),
                )
            ]
        try:
            await self._hold(keys=self._keys, args=[repr(now), *map(repr, tats)])
        except REDIS_UNREACHABLE as exc:
            self._unreachable(exc)

    def _unreachable(self, exc: BaseException) -> None:
        if not self._redis_down:
            self._redis_down = True
            _log.warning(
                "rate limiter cannot reach Redis; calls go unlimited",
                limiter=self.name,
                error=f"{type(exc).__name__}: {exc}",
            )
