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

The adaptive limit (AIMD, as TCP finds a path's capacity). The configured RPM/TPM is a
ceiling; the fleet runs at a *share* of it, kept in Redis next to the TATs and read by the
same script (still one round trip per call). A 429 from the provider (the limit is lower
than configured) multiplies the share by ``decrease`` (0.7); so does, more gently
(``(1 + decrease) / 2``), an answer slower than ``latency_s`` (the provider is queueing).
One decrease per congestion event: a signal from a call sent before the latest decrease,
or within ``cooldown_s`` (2 s) after it, is ignored (the calls in flight when the limit
was hit say nothing new, and the provider's own bucket takes a moment to drain after an
overshoot: without the pause one overshoot cascades to the floor). The share then grows
back linearly with time, from 0 to 1 in ``recovery_s`` (60 s), computed from the time of
the last decrease, so growing costs no writes (the share never drops below
``min_share``, 5 %).

Not solved: a decrease paces the slots reserved *after* it. Slots reserved before it (a
burst of calls that all reserved at once, at the configured pace, before the first 429
came back) still go out at the old pace. Stretching them in Redis was tried and dropped:
the stretch compounds over repeated decreases and does not shrink back as the share
grows (a 600/min run ended with its backlog stretched from 160 s to over 2,000 s). So
the adaptive limit helps calls that arrive over time, as a worker's do, and not a single
burst (bench/RESULTS.md). Keep LLM_RATE_LIMIT_MAX_WAIT short: it bounds that backlog.

Failure accepted: a reserved slot whose call is then cancelled is wasted (the fleet runs a
little under the limit, never over). If Redis cannot help (unreachable, or refusing: any
redis-py error), calls go unlimited (the provider's 429s and the breaker still guard),
logged once.

One clock: the theoretical arrival times and the share's timestamps in Redis are on
Redis's clock. The GCRA script takes ``TIME`` itself and returns it, and the process keeps
its offset to it for the hold-off and the decrease (a process 600 s ahead put its own
wall clock into the shared TAT, and the processes on time were refused for ten minutes).
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

from aura import events
from aura.errors import CircuitOpenError
from aura.events import LLMRateLimitChanged, LLMRateLimited, RateLimitOutcome
from aura.redis_errors import REDIS_UNREACHABLE

__all__ = ["KEY_PREFIX", "LLMRateLimitedError", "RateLimit", "RateLimiter", "estimate_tokens"]

KEY_PREFIX = "aura:llm_rate:"
# Round trips in flight per limiter: hundreds of calls would otherwise fill redis-py's
# pool (MaxConnectionsError, which is back-pressure, not an unreachable Redis)
_MAX_CONCURRENT_ROUND_TRIPS = 32
_log = structlog.get_logger("aura.llm.ratelimit")

# KEYS: request TAT, token TAT, adaptive share (hash: base, at).
# ARGV: now, rpm, tpm, tokens, burst seconds, max wait, recovery seconds (0: not adaptive),
# and "1" to take Redis's clock (TIME) for now instead of ARGV[1].
# A limit of 0 means no limit of that kind. Returns {allowed, wait, share, now}.
_GCRA = """
local now = tonumber(ARGV[1])
if ARGV[8] == '1' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local tokens = tonumber(ARGV[4])
local burst = tonumber(ARGV[5])
local max_wait = tonumber(ARGV[6])
local recovery = tonumber(ARGV[7])
local share = 1
if recovery > 0 then
  local state = redis.call('HMGET', KEYS[3], 'base', 'at')
  if state[1] then
    share = math.min(1, tonumber(state[1]) + (now - tonumber(state[2])) / recovery)
  end
end
local wait, tats = 0, {}
for i = 1, 2 do
  local per_minute = tonumber(ARGV[1 + i]) * share
  if per_minute > 0 then
    local interval = 60 / per_minute
    local cost = interval * (i == 1 and 1 or tokens)
    local window = interval * math.max(per_minute / 60 * burst, i == 1 and 1 or tokens)
    local tat = math.max(tonumber(redis.call('GET', KEYS[i]) or now), now)
    local new_tat = tat + cost
    wait = math.max(wait, new_tat - window - now)
    tats[i] = new_tat
  end
end
-- %.17g: Lua's tostring keeps 14 digits, a tenth of a millisecond of an epoch time
local at = string.format('%.17g', now)
if wait > max_wait then
  return {0, string.format('%.17g', wait), string.format('%.17g', share), at}
end
for i = 1, 2 do
  if tats[i] then
    local ttl = math.ceil((tats[i] - now) * 1000) + 1000
    redis.call('SET', KEYS[i], string.format('%.17g', tats[i]), 'PX', ttl)
  end
end
return {1, string.format('%.17g', wait), string.format('%.17g', share), at}
"""

# KEYS: adaptive share. ARGV: now, the signalling call's send time, factor, min share,
# recovery seconds, cooldown seconds. Returns {decreased, share}.
_DECREASE = """
local now = tonumber(ARGV[1])
local recovery = tonumber(ARGV[5])
local state = redis.call('HMGET', KEYS[1], 'base', 'at')
local share, at = 1, 0
if state[1] then
  at = tonumber(state[2])
  share = math.min(1, tonumber(state[1]) + (now - at) / recovery)
end
if tonumber(ARGV[2]) <= at + tonumber(ARGV[6]) then
  return {0, string.format('%.17g', share)}
end
local base = math.max(share * tonumber(ARGV[3]), tonumber(ARGV[4]))
redis.call('HSET', KEYS[1], 'base', string.format('%.17g', base), 'at', string.format('%.17g', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(((1 - base) * recovery + 60) * 1000))
return {1, string.format('%.17g', base)}
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
    seconds' worth of budget may go at once. The adaptive share (module doc): ``adaptive``
    on or off, ``decrease`` on a 429, ``recovery_s`` from 0 back to the whole limit,
    ``latency_s`` an answer slower than which is a (gentler) signal too (0: ignored)."""

    rpm: float = 0.0
    tpm: float = 0.0
    burst_s: float = 1.0
    adaptive: bool = True
    decrease: float = 0.7
    recovery_s: float = 60.0
    latency_s: float = 0.0
    min_share: float = 0.05
    cooldown_s: float = 2.0

    def __post_init__(self) -> None:
        if self.rpm < 0 or self.tpm < 0 or self.burst_s <= 0:
            raise ValueError("rpm and tpm must be >= 0 and burst_s > 0")
        if not 0 < self.decrease < 1 or self.recovery_s <= 0 or not 0 < self.min_share <= 1:
            raise ValueError("decrease and min_share must be in (0, 1); recovery_s > 0")
        if self.cooldown_s < 0:
            raise ValueError("cooldown_s must be >= 0")

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
        redis_time: bool | None = None,
    ) -> None:
        self.name = name
        self.limit = limit
        self._redis = redis
        self._clock = clock
        # Shared time is Redis's: the GCRA takes TIME itself and tells its offset, which
        # the hold-off and the share's decrease then apply (an injected clock, as is).
        self._redis_time = (clock is time.time) if redis_time is None else redis_time
        self._offset = 0.0
        self._sleep = sleep
        self._keys = [f"{KEY_PREFIX}{name}:requests", f"{KEY_PREFIX}{name}:tokens"]
        self._share_key = f"{KEY_PREFIX}{name}:share"
        self._request_interval = 60.0 / limit.rpm if limit.rpm > 0 else 0.0
        self._token_interval = 60.0 / limit.tpm if limit.tpm > 0 else 0.0
        self._request_window = self._request_interval * max(limit.rpm / 60.0 * limit.burst_s, 1)
        self._gcra = redis.register_script(_GCRA) if redis is not None else None
        self._hold = redis.register_script(_HOLD_OFF) if redis is not None else None
        self._decrease = redis.register_script(_DECREASE) if redis is not None else None
        self._redis_down = False
        self._round_trips = asyncio.Semaphore(_MAX_CONCURRENT_ROUND_TRIPS)
        self.share = 1.0  # the adaptive share of the limit, as this process last saw it
        self._decreased_at = 0.0  # ... and the latest decrease it made or saw
        events.emit(LLMRateLimitChanged(name, limit.rpm, limit.tpm))

    async def acquire(self, tokens: int, max_wait: float) -> float:
        """Reserve a slot for one call of ``tokens``; sleep until it comes and return the
        seconds waited, or raise ``LLMRateLimitedError`` (nothing reserved) when the slot
        is more than ``max_wait`` away. One Redis round trip."""
        if self._gcra is None or not self.limit.enabled:
            return 0.0
        limit = self.limit
        try:
            async with self._round_trips:
                now = self._clock()  # read once the round trip may start: never stale
                args = [
                    repr(now),
                    repr(limit.rpm),
                    repr(limit.tpm),
                    str(max(tokens, 1)),
                    repr(limit.burst_s),
                    repr(max(max_wait, 0.0)),
                    repr(limit.recovery_s if limit.adaptive else 0.0),
                    "1" if self._redis_time else "0",
                ]
                allowed, wait_text, share_text, at_text = await self._gcra(
                    keys=[*self._keys, self._share_key], args=args
                )
                if self._redis_time:
                    self._offset = float(at_text) - now
        except REDIS_UNREACHABLE as exc:
            self._unreachable(exc)
            return 0.0
        self._redis_down = False
        self._saw_share(float(share_text))
        wait = max(float(wait_text), 0.0)
        if not int(allowed):
            events.emit(LLMRateLimited(self.name, RateLimitOutcome.DEFERRED, wait))
            raise LLMRateLimitedError(self.name, wait)
        events.emit(LLMRateLimited(self.name, RateLimitOutcome.ADMITTED, wait))
        if wait > 0:
            await self._sleep(wait)
        return wait

    async def slow_down(self, sent_at: float, *, gently: bool = False) -> bool:
        """A call sent at ``sent_at`` met the provider's limit (a 429) or, ``gently``,
        answered slower than ``latency_s``: the fleet's share shrinks, unless the call
        was sent before the latest decrease or within ``cooldown_s`` after it. Returns
        whether it shrank. One round trip, only on those answers (and none when this
        process already knows of a decrease that covers it)."""
        limit = self.limit
        if self._decrease is None or not limit.adaptive:
            return False
        if sent_at <= self._decreased_at + limit.cooldown_s:
            return False
        factor = (1 + limit.decrease) / 2 if gently else limit.decrease
        now = self._clock()
        shared = [now + self._offset, sent_at + self._offset]  # on Redis's clock
        args = [repr(shared[0]), repr(shared[1]), repr(factor), repr(limit.min_share)]
        try:
            decreased, share_text = await self._decrease(
                keys=[self._share_key],
                args=[*args, repr(limit.recovery_s), repr(limit.cooldown_s)],
            )
        except REDIS_UNREACHABLE as exc:
            self._unreachable(exc)
            return False
        if int(decreased):
            self._decreased_at = now
            events.emit(LLMRateLimited(self.name, RateLimitOutcome.DECREASED))
        self._saw_share(float(share_text))
        return bool(int(decreased))

    def _saw_share(self, share: float) -> None:
        if abs(share - self.share) >= 0.01 or (share == 1.0 and self.share != 1.0):
            if share < self.share:  # a decrease made elsewhere: ours would be older
                self._decreased_at = max(self._decreased_at, self._clock())
            self.share = share
            rpm, tpm = self.limit.rpm * share, self.limit.tpm * share
            events.emit(LLMRateLimitChanged(self.name, rpm, tpm))

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
        shared = [now + self._offset, *(tat + self._offset if tat else 0.0 for tat in tats)]
        try:
            await self._hold(keys=self._keys, args=[*map(repr, shared)])
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
