"""Tenants' LLM token budgets, per minute and per day, enforced fleet-wide through Redis.

A budgeted call reserves its estimate (prompt characters / 4 + ``max_tokens``, as the
rate limiter estimates) before it is made, and is settled with the usage the provider
reported once it is done; one Lua script does both, one round trip per call:

    EVALSHA  settle the calls that ended since  ->  reserve this one, or refuse it
    fits                     reserved; the call goes
    no room in the minute    ``LLMBudgetExceededError`` (a ``CircuitOpenError``), with
      or the day             when there will be; no call made: the task is deferred
                             (``aura.messaging.rules.BudgetExceeded``), and past
                             LLM_BUDGET_MAX_DEFERRALS dead-lettered (``budget_exceeded``)

Settling rides on the process's next reservation (any budgeted tenant's), so a call
costs no second round trip; with no call to carry them, settlements go on their own
after ``flush_interval_s`` (1 s). What a call is charged: the provider's reported total;
the estimate when it reported none or the call's fate is unknown (a timeout, a dropped
connection: it may have been served); nothing when no request was answered (an open
breaker, the rate limiter, an error status).

Windows: sliding, in 60 buckets each (1 s for the minute, 24 min for the day). A call
counts against its tenant from its reservation until at least ``window + allowance``
later, so in *any* 60 s (or 24 h) the tokens reserved never pass the budget: no burst of
two budgets across a calendar minute's edge, and a window reopens bucket by bucket, not
all at once. The allowance (1 s, plus LLM_RATE_LIMIT_MAX_WAIT while rate limits are on)
covers the time from a reservation until the provider receives the call, so the promise
holds where the tokens are spent; a call held longer (waiting on a breaker's trial) is
not made, but put off as for an open breaker. Counted on Redis's clock (``TIME``).

The promise assumes the estimate bounds the usage (set ``max_tokens``; the prompt's
characters / 4 bounds its tokens for ordinary text). A call that used more than its
estimate is charged the difference when it settles, which may put its window over: the
calls after it wait longer, none is refused after the fact.

Failure accepted: if Redis cannot help (any redis-py error), calls go unbudgeted, logged
once; settlements lost with a failed round trip leave the estimates charged (on the safe
side), until their buckets age out. A tenant without a budget costs no round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from redis.asyncio import Redis

from aura import events
from aura.budget_settings import (
    TokenBudget,
    canonical_tenant,
    parse_tenant_budgets,
    parse_token_budget,
)
from aura.config import Settings
from aura.errors import (
    CircuitOpenError,
    LLMBudgetExceededError,
    LLMHTTPStatusError,
    ServiceUnavailableError,
)
from aura.events import BudgetWindow, LLMBudgetCharged, LLMBudgetRefused
from aura.llm._budget_scripts import RESERVE, USAGE
from aura.llm.protocol import Completion
from aura.llm.ratelimit import estimate_tokens
from aura.redis_errors import REDIS_CANNOT_HELP

__all__ = [
    "KEY_PREFIX",
    "LLMBudgetExceededError",
    "Reservation",
    "TenantBudgets",
    "TenantUsage",
    "TokenBudget",
    "current_tenant",
]

KEY_PREFIX = "aura:llm_budget:"
_BUCKETS = 60
_MAX_CONCURRENT_ROUND_TRIPS = 32  # as the rate limiter: never fill redis-py's pool
_SETTLEMENTS_PER_TRIP = 128
_MAX_PENDING = 4096  # settlements waiting for a round trip (beyond: dropped, as if lost)
_USAGE_TENANTS_PER_TRIP = 500
_KEY_SAFE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_log = structlog.get_logger("aura.llm.budgets")


def _maybe_served(exc: BaseException) -> bool:
    """Whether a failed call may have been served (and billed): not when nothing was
    sent (an open breaker, the rate limiter) or the provider answered with an error."""
    return not isinstance(exc, CircuitOpenError | LLMHTTPStatusError)


def current_tenant() -> str | None:
    """The tenant of the delivery being run, as its log context names it (a resilient
    task with a ``tenant_id`` argument binds it), else None."""
    tenant = structlog.contextvars.get_contextvars().get("tenant")
    return tenant if isinstance(tenant, str) and tenant else None


@dataclass(frozen=True, slots=True)
class Reservation:
    """One call's reserved tokens: where they sit, to settle them once it is done."""

    tenant: str
    tokens: int
    keys: tuple[str, str]  # the tenant's minute and day hashes
    buckets: tuple[str, str]  # the buckets charged in each


@dataclass(frozen=True, slots=True)
class TenantUsage:
    """What a tenant has used in the sliding minute and day, and its limits (None: no
    limit of that kind)."""

    tenant: str
    minute_used: int
    day_used: int
    minute_limit: int | None
    day_limit: int | None


class TenantBudgets:
    """Tenants' token budgets (``budgets`` by tenant, ``default`` for the rest; a tenant
    mapped to None has none), enforced through ``redis``. ``minute_s`` and ``day_s`` are
    the windows' lengths (tests shorten them); ``allowance_s`` is the module doc's."""

    def __init__(
        self,
        budgets: Mapping[str, TokenBudget | None] | None = None,
        default: TokenBudget | None = None,
        *,
        redis: Redis | None,
        minute_s: float = 60.0,
        day_s: float = 86_400.0,
        allowance_s: float = 1.0,
        completion_tokens: int = 512,
        flush_interval_s: float = 1.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        redis_time: bool | None = None,
    ) -> None:
        if minute_s <= 0 or day_s <= 0 or allowance_s < 0 or flush_interval_s <= 0:
            raise ValueError("windows and the flush interval must be > 0, the allowance >= 0")
        self._budgets = {canonical_tenant(t): b for t, b in (budgets or {}).items()}
        self.default = default if default is not None and default.enabled else None
        self._redis = redis
        self._windows = ((BudgetWindow.MINUTE, minute_s), (BudgetWindow.DAY, day_s))
        self._shape = [
            *(repr(x) for _, length in self._windows for x in (length, length / _BUCKETS)),
            repr(allowance_s),
        ]
        self.allowance_s = allowance_s
        self.completion_tokens = completion_tokens  # the estimate's answer without max_tokens
        self._flush_interval = flush_interval_s
        self._clock = clock
        self._sleep = sleep
        self._redis_time = (clock is time.time) if redis_time is None else redis_time
        configured = self.default is not None or any(self._budgets.values())
        self._reserve = redis.register_script(RESERVE) if redis and configured else None
        self._usage = redis.register_script(USAGE) if redis is not None else None
        self._pending: dict[tuple[str, str, str, str], int] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._round_trips = asyncio.Semaphore(_MAX_CONCURRENT_ROUND_TRIPS)
        self._redis_down = False

    @classmethod
    def from_settings(
        cls, settings: Settings, *, redis: Redis | None, **options: Any
    ) -> TenantBudgets:
        """LLM_TENANT_BUDGETS, LLM_TENANT_BUDGET_DEFAULT and
        LLM_COMPLETION_TOKENS_ESTIMATE (``options``: the constructor's keywords)."""
        default = parse_token_budget(settings.llm_tenant_budget_default)
        budgets = parse_tenant_budgets(settings.llm_tenant_budgets)
        options.setdefault("completion_tokens", settings.llm_completion_tokens_estimate)
        return cls(budgets, default, redis=redis, **options)

    @property
    def enabled(self) -> bool:
        """Some tenant has a budget, and a Redis keeps them."""
        return self._reserve is not None

    def budget_for(self, tenant: str) -> TokenBudget | None:
        """``tenant``'s budget: its own (None if mapped to none), else the default."""
        if tenant in self._budgets:
            return self._budgets[tenant]
        return self._budgets.get(canonical_tenant(tenant), self.default)

    def keys_for(self, tenant: str) -> tuple[str, str]:
        """The tenant's minute and day hashes (an id unfit for a key goes hashed)."""
        name = canonical_tenant(tenant)
        if not _KEY_SAFE.fullmatch(name):
            name = "h:" + hashlib.sha256(name.encode("utf-8", "replace")).hexdigest()[:32]
        minute, day = (length for _, length in self._windows)
        return f"{KEY_PREFIX}{name}:{minute:g}s", f"{KEY_PREFIX}{name}:{day:g}s"

    # -- a call --------------------------------------------------------------------------

    async def around(
        self,
        tenant: str | None,
        body: Mapping[str, Any],
        call: Callable[[float | None], Awaitable[Completion]],
    ) -> Completion:
        """Make ``call`` within ``tenant``'s budget (default: ``current_tenant()``):
        reserve the estimate for ``body`` (its ``messages``, ``max_tokens`` and ``n``),
        call, settle. ``call`` gets the event loop's time by which it must reach the
        provider (None: unbudgeted), and must not call past it."""
        tenant = tenant if tenant is not None else current_tenant()
        tokens = estimate_tokens(dict(body), self.completion_tokens)
        reservation = await self.reserve(tenant, tokens) if tenant else None
        if reservation is None:
            return await call(None)
        try:
            completion = await call(asyncio.get_running_loop().time() + self.allowance_s)
        except BaseException as exc:
            self.settle(reservation, None if _maybe_served(exc) else 0)
            raise
        self.settle(reservation, completion.usage.total_tokens or None)
        return completion

    async def reserve(self, tenant: str | None, tokens: int) -> Reservation | None:
        """Reserve ``tokens`` of ``tenant``'s budget, settling what is pending on the way
        (one round trip); None when the tenant has no budget or Redis cannot help.
        ``LLMBudgetExceededError`` (nothing reserved) when it has no room."""
        budget = self.budget_for(tenant) if tenant and self._reserve else None
        if budget is None or tenant is None:
            return None
        keys = self.keys_for(tenant)
        limits = [str(limit or 0) for limit in (budget.per_minute, budget.per_day)]
        try:
            reply = await self._round_trip(max(int(tokens), 1), limits, keys)
        except REDIS_CANNOT_HELP as exc:
            self._cannot_help(exc)
            return None
        reserved, minute_wait, day_wait, _, minute_bucket, day_bucket = reply
        if not int(reserved):
            raise self._refusal(tenant, float(minute_wait), float(day_wait))
        return Reservation(tenant, max(int(tokens), 1), keys, (minute_bucket, day_bucket))

    def settle(self, reservation: Reservation, used: int | None) -> None:
        """The call is done: charge ``used`` tokens (None: unknown, the estimate stays).
        The difference goes with the next round trip, or the flush timer's."""
        charged = reservation.tokens if used is None or used < 0 else int(used)
        events.emit(LLMBudgetCharged(charged))
        delta = charged - reservation.tokens
        if delta == 0 or self._reserve is None:
            return
        key = (*reservation.keys, *reservation.buckets)
        if key not in self._pending and len(self._pending) >= _MAX_PENDING:
            return  # bounded: the estimate stays charged until its bucket ages out
        self._pending[key] = self._pending.get(key, 0) + delta
        if self._flusher is None or self._flusher.done():
            with contextlib.suppress(RuntimeError):  # no loop: the next reservation carries it
                self._flusher = asyncio.get_running_loop().create_task(self._flush_later())

    async def flush(self) -> None:
        """Send every pending settlement now (a round trip per 128)."""
        while self._pending and self._reserve is not None:
            try:
                await self._round_trip(0, ["0", "0"], None)
            except REDIS_CANNOT_HELP as exc:
                self._cannot_help(exc)
                return

    async def aclose(self) -> None:
        """Stop the flush timer and send what is pending (best effort)."""
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        await self.flush()

    # -- the reader ------------------------------------------------------------------------

    async def usage(self, tenant_ids: Sequence[str]) -> dict[str, TenantUsage]:
        """Each tenant's tokens used in the sliding minute and day, with its limits, by
        the id given (one round trip per 500 tenants; 0 used without a Redis).
        ``ServiceUnavailableError`` when Redis cannot be read."""
        tenants = list(dict.fromkeys(tenant_ids))
        used = [0] * (2 * len(tenants))
        script = self._usage
        for start in range(0, len(tenants) if script else 0, _USAGE_TENANTS_PER_TRIP):
            chunk = tenants[start : start + _USAGE_TENANTS_PER_TRIP]
            keys = [key for tenant in chunk for key in self.keys_for(tenant)]
            try:
                assert script is not None
                counts = await script(keys=keys, args=[self._now(), *self._shape])
            except REDIS_CANNOT_HELP as exc:
                raise ServiceUnavailableError(
                    f"cannot read tenant budgets from Redis: {type(exc).__name__}: {exc}"
                ) from exc
            used[2 * start : 2 * start + len(keys)] = [int(n) for n in counts]
        report: dict[str, TenantUsage] = {}
        for i, tenant in enumerate(tenants):
            budget = self.budget_for(tenant) or TokenBudget()
            minute, day = used[2 * i], used[2 * i + 1]
            report[tenant] = TenantUsage(tenant, minute, day, budget.per_minute, budget.per_day)
        return report

    # -- inside ----------------------------------------------------------------------------

    def _now(self) -> str:
        return "" if self._redis_time else repr(self._clock())

    async def _round_trip(
        self, tokens: int, limits: list[str], keys: tuple[str, str] | None
    ) -> list[str]:
        """One EVALSHA: up to 128 pending settlements, then the reservation (if any)."""
        assert self._reserve is not None
        taken = list(self._pending.items())[:_SETTLEMENTS_PER_TRIP]
        for key, _ in taken:
            del self._pending[key]
        settle_keys = [k for (minute, day, _, _), _ in taken for k in (minute, day)]
        settle_args = [a for (_, _, mb, db), delta in taken for a in (mb, db, str(delta))]
        async with self._round_trips:
            args = [self._now(), str(tokens), *limits, *self._shape, str(len(taken))]
            reply = await self._reserve(
                keys=[*settle_keys, *(keys or ())], args=[*args, *settle_args]
            )
        self._redis_down = False
        return [r.decode() if isinstance(r, bytes) else str(r) for r in reply]

    def _refusal(self, tenant: str, minute_wait: float, day_wait: float) -> LLMBudgetExceededError:
        """The window that refused (the longer wait), and when it has room."""
        waits = []
        for (window, length), wait in zip(self._windows, (minute_wait, day_wait), strict=True):
            if wait != 0:  # -1: more than the whole budget; it never fits (the bound ends it)
                waits.append((wait if wait > 0 else length + self.allowance_s, window, length))
        wait, window, length = max(waits)
        events.emit(LLMBudgetRefused(window))
        return LLMBudgetExceededError(tenant, wait, window.value, length)

    async def _flush_later(self) -> None:
        await self._sleep(self._flush_interval)
        await self.flush()

    def _cannot_help(self, exc: BaseException) -> None:
        if not self._redis_down:
            self._redis_down = True
            _log.warning(
                "tenant budgets cannot use Redis; calls go unbudgeted",
                error=f"{type(exc).__name__}: {exc}",
            )
