"""A circuit breaker for asyncio whose state is shared by every process on one Redis.

The states and the opening rule are ``aura.llm._breaker_state``'s (a pure state machine);
the Redis side is ``aura.llm._breaker_store``'s. This module is what callers use.

Why written here and not taken from a library: pybreaker (the seed's choice) has no
asyncio support (an ``async def`` it wraps is returned unawaited and counted a success),
its Redis storage is synchronous and it holds a lock across the protected call; none of
the Python breakers we checked limits half-open to one trial call across a fleet or keeps
the closed path free of Redis round trips.

How the fleet shares it. The record (state, consecutive failures, open-until, trial lease)
lives in one Redis hash. Every change is one pure function (``transition``) applied
atomically: in Redis under WATCH/MULTI (redis-py's ``transaction`` retries on conflict),
locally by plain assignment. A process caches the record and refreshes it at most once
per ``refresh_interval`` (1 s), so a successful call in the closed state makes no Redis
round trip of its own, and every process sees a breaker opened elsewhere within 1 s.
The process whose transition opened the breaker emits ``CircuitBreakerOpened``: the
opens counter moves once per fleet transition.

Under load (hundreds of calls in flight per process), each process keeps at most one
report of each kind in flight per breaker: failures that come while one is being told go
together with the next (one transaction, applied in order), and once this process sees
the breaker open they are stragglers and go nowhere (``transition`` ignores them anyway);
a success after failures ends the run with one transaction, not one per success; when
the trial comes due, one caller per process asks for it and the others are rejected
without a round trip; callers arriving before the first read share it. So an outage
that fails 200 calls at once costs a process two transactions, not 200 contending ones.
The open path rejects without a coroutine of its own and ``CircuitOpenError`` formats its
message only when asked (bench/llm_breaker.py: both paths, one caller and 200).

If Redis cannot help (unreachable, or refusing: any redis-py error) the breaker carries
on with its cached record as local state, logs that once (and once again when Redis is
back), and retries Redis every ``redis_retry_interval`` seconds.

One clock. Every time in the shared record (opened at, open until, the trial lease, the
failures' window) is on Redis's clock: each read fetches ``TIME`` with the record (one
pipelined round trip) and the process keeps its offset to it, so a host whose wall clock
is 600 s ahead reads "open until" as the others do (it took the trial deadline 607 s into
the future for the others, and trials came 1.0-1.2 s apart instead of the 2 s reset
timeout). Between reads the offset stands (the clock's rate is trusted, not its value).
An injected ``clock`` (tests drive a fake one) is used as it is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from redis.asyncio import Redis

from aura import events
from aura.errors import CircuitOpenError
from aura.events import CircuitBreakerOpened, CircuitState, CircuitStateChanged
from aura.llm._breaker_state import BreakerRecord, Decision, transition, transition_all
from aura.llm._breaker_store import REGISTRY_KEY, BreakerStore
from aura.redis_errors import REDIS_UNREACHABLE

__all__ = ["REGISTRY_KEY", "BreakerRecord", "CircuitBreaker", "Decision", "transition"]

T = TypeVar("T")
# Module constants: an Enum member looked up on its class costs ~0.2 us (the hot path)
_CLOSED, _OPEN, _HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN
_log = structlog.get_logger("aura.llm.breaker")
_ALLOW = Decision()


class CircuitBreaker:
    """An asyncio circuit breaker, local or shared through Redis; see the module doc."""

    def __init__(
        self,
        name: str = "llm",
        *,
        fail_max: int = 3,
        reset_timeout: float = 60.0,
        redis: Redis | None = None,
        clock: Callable[[], float] = time.time,
        is_failure: Callable[[BaseException], bool] = lambda exc: isinstance(exc, Exception),
        trial_lease: float = 60.0,
        refresh_interval: float = 1.0,
        redis_retry_interval: float = 5.0,
        failure_window: float = 60.0,
        redis_time: bool | None = None,
    ) -> None:
        if fail_max < 1 or reset_timeout <= 0 or trial_lease <= 0 or failure_window <= 0:
            raise ValueError(
                "fail_max must be >= 1; reset_timeout, trial_lease and failure_window > 0"
            )
        self.name = name
        self.fail_max = fail_max
        self.reset_timeout = reset_timeout
        self.failure_window = failure_window
        self._unrecorded_success = 0.0  # latest success not yet told to Redis (hot path)
        self.key = f"aura:circuit_breaker:{name}"
        self._redis = redis
        self._store = None if redis is None else BreakerStore(redis, name, self.key)
        self._clock = clock
        # Shared time is Redis's (TIME), not this process's wall clock: the offset to it,
        # measured with every read. An injected clock (tests) is taken as it is, unless
        # ``redis_time`` says otherwise.
        if redis_time is None:
            redis_time = clock is time.time
        self._redis_clock = redis is not None and redis_time
        self._offset = 0.0
        self._is_failure = is_failure
        self._trial_lease = trial_lease
        self._refresh_interval = refresh_interval
        self._redis_retry_interval = redis_retry_interval
        self._record = BreakerRecord()
        self._shown_state = _CLOSED
        # Local-only breakers never refresh; shared ones refresh on their first call.
        self._fresh_until = float("inf") if redis is None else float("-inf")
        self._redis_down = False
        self._loaded = redis is None  # a shared breaker knows nothing until its first read
        self._loading: asyncio.Future[None] | None = None  # the first read, shared
        # One report of each kind in flight per breaker (see "Under load" in the module doc)
        self._failures_pending: list[float] = []
        self._reporting_failures = False
        self._reporting_success = False
        self._acquiring = False
        self._registered = False  # in REGISTRY_KEY (on the first read)
        events.emit(CircuitStateChanged(name, _CLOSED))

    # -- what callers see -----------------------------------------------------------

    @property
    def state(self) -> CircuitState:
        """The state as this process last saw it (at most ``refresh_interval`` old)."""
        return self._record.state

    @property
    def shared(self) -> bool:
        """True while the state is shared through Redis (False: local only or fallback)."""
        return self._redis is not None and not self._redis_down

    def _now(self) -> float:
        """Shared time: this process's clock, corrected to Redis's when shared."""
        return self._clock() + self._offset

    async def call(self, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        """Run ``await fn(*args, **kwargs)`` under the breaker."""
        now = self._now()
        record = self._record
        if now < self._fresh_until and record.state is _CLOSED:
            # The hot path: closed and fresh. No Redis, no lock, no allocation.
            try:
                result = await fn(*args, **kwargs)
            except BaseException as exc:
                await self._after_failure(exc, trial=False)
                raise
            if self._record.failures:  # this process knows of failures: tell Redis now
                await self._report_success(self._now())
            else:
                self._unrecorded_success = now  # told to Redis with the next refresh
            return result
        if now < self._fresh_until and (now < record.open_until or now < record.trial_until):
            # Open and fresh (or a trial is running): reject here, no Redis.
            raise CircuitOpenError(self.name, self._retry_after(now))
        return await self._call_checked(now, fn, args, kwargs)

    async def wait_for_trial(
        self, bound: float, *, sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep
    ) -> bool:
        """While a trial call is running (half-open), wait at most ``bound`` seconds for
        its outcome, looking every ``refresh_interval`` (this process's view, Redis's at
        most that old); True once the breaker is closed. A caller refused during the
        trial would otherwise be put off until the trial's lease ran out (~35 s more,
        seen, for a trial that succeeded 0.3 s later)."""
        waited = 0.0  # counted, not read off the clock: an injected one may stand still
        while self._record.state is _HALF_OPEN:
            if waited >= bound:
                return False
            step = min(self._refresh_interval, bound - waited)
            await sleep(step)
            waited += step
            now = self._now()
            if now >= self._fresh_until:
                await self._refresh(now)
        return self._record.state is _CLOSED

    async def reset(self) -> None:
        """Force the breaker closed, fleet-wide (an operator's action)."""
        await self._apply("trial_success")

    # -- the slow path ------------------------------------------------------------------

    async def _call_checked(
        self, now: float, fn: Callable[..., Awaitable[T]], args: Any, kwargs: Any
    ) -> T:
        if now >= self._fresh_until:
            await self._refresh(now)
            now = self._now()  # the read may have corrected the clock
        record = self._record
        decision = _ALLOW
        if record.state is not _CLOSED:
            if now < record.open_until or now < record.trial_until or self._acquiring:
                # Still open, a trial is running, or this process is asking Redis for
                # the trial already: reject without a round trip.
                raise CircuitOpenError(self.name, self._retry_after(now))
            self._acquiring = True
            try:
                decision = await self._apply("acquire")
            finally:
                self._acquiring = False
            if not decision.allowed:
                raise CircuitOpenError(self.name, self._retry_after(self._now()))
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            await self._after_failure(exc, trial=decision.trial)
            raise
        if decision.trial:
            await self._apply("trial_success")
        elif self._record.failures:
            await self._report_success(self._now())
        else:
            self._unrecorded_success = now
        return result

    def _retry_after(self, now: float) -> float:
        record = self._record
        wait = (record.trial_until if record.state is _HALF_OPEN else record.open_until) - now
        # Due but not yet decided (this process is asking for the trial): ask again soon.
        return wait if wait > 0 else self._refresh_interval

    async def _after_failure(self, exc: BaseException, *, trial: bool) -> None:
        if not isinstance(exc, Exception):  # cancelled or exiting: the call told us nothing
            if trial:
                await self._apply("trial_abandoned")
            return
        if self._is_failure(exc):
            if trial:
                await self._apply("trial_failure")
            else:
                await self._report_failure(self._now())
        elif trial:  # the provider answered (a 4xx): it is up, whatever the request did
            await self._apply("trial_success")
        elif self._record.failures:
            await self._report_success(self._now())

    async def _report_failure(self, at: float) -> None:
        """Record a failure, fleet-wide. Failures that come while this process's report
        is in flight go with its next one (one transaction, in order); once the breaker
        is open here they are stragglers and tell nothing (``transition`` ignores them)."""
        self._failures_pending.append(at)
        if self._reporting_failures:
            return
        self._reporting_failures = True
        try:
            while self._failures_pending and self._record.state is _CLOSED:
                batch, self._failures_pending = self._failures_pending, []
                await self._apply_all([("failure", when) for when in batch])
            self._failures_pending.clear()
        finally:
            self._reporting_failures = False

    async def _report_success(self, at: float = 0.0) -> None:
        """Record this process's latest success (``at``, or the one not yet told) if the
        run of failures it knows of is older: the run ends, fleet-wide. One report in
        flight per breaker; a success that comes meanwhile goes after it, if still needed."""
        self._unrecorded_success = max(self._unrecorded_success, at)
        if self._reporting_success:
            return
        self._reporting_success = True
        try:
            while True:
                success, record = self._unrecorded_success, self._record
                if not (success and record.failures and record.state is _CLOSED):
                    return
                self._unrecorded_success = 0.0
                if success < record.last_failure:
                    return  # a failure came after it: it breaks no run
                await self._apply("success", at=success)
        finally:
            self._reporting_success = False

    async def _apply(self, event: str, at: float | None = None) -> Decision:
        return await self._apply_all([(event, self._now() if at is None else at)])

    async def _apply_all(self, changes: list[tuple[str, float]]) -> Decision:
        """Apply events in order, atomically (one transaction when shared)."""
        decision: Decision
        if self.shared:
            try:
                record, decision = await self._apply_in_redis(changes)
            except REDIS_UNREACHABLE as exc:
                self._fall_back(changes[-1][1], exc)
                record, decision = self._transition_all(self._record, changes)
        else:
            record, decision = self._transition_all(self._record, changes)
        self._adopt(record)
        if decision.opened:
            events.emit(CircuitBreakerOpened(self.name))
            _log.warning(
                "circuit breaker opened",
                breaker=self.name,
                failures=record.failures,
                reset_timeout=self.reset_timeout,
                shared=self.shared,
            )
        return decision

    def _transition_all(
        self, record: BreakerRecord, changes: list[tuple[str, float]]
    ) -> tuple[BreakerRecord, Decision]:
        return transition_all(
            record,
            changes,
            fail_max=self.fail_max,
            reset_timeout=self.reset_timeout,
            trial_lease=self._trial_lease,
            failure_window=self.failure_window,
        )

    async def _apply_in_redis(
        self, changes: list[tuple[str, float]]
    ) -> tuple[BreakerRecord, Decision]:
        assert self._store is not None
        outcome = await self._store.apply(lambda current: self._transition_all(current, changes))
        self._loaded = True
        self._fresh_until = self._now() + self._refresh_interval
        return outcome

    async def _refresh(self, now: float) -> None:
        if self._redis is None:
            return
        if not self._loaded:
            # No cache worth using before the first read: callers wait for one read.
            if self._loading is None or self._loading.done():
                self._loading = asyncio.ensure_future(self._read(now))
            await asyncio.shield(self._loading)
            return
        # Claim the refresh before awaiting: concurrent callers use the cache meanwhile.
        self._fresh_until = now + (
            self._redis_retry_interval if self._redis_down else self._refresh_interval
        )
        await self._read(now)

    async def _read(self, now: float) -> None:
        assert self._store is not None
        try:
            record, redis_now = await self._store.read(with_time=self._redis_clock)
            if redis_now is not None:  # Redis's clock came with the record
                self._offset = redis_now - self._clock()
                now = self._now()
            if not self._registered:  # once per process: ``aura breaker status`` lists it
                await self._store.register(now)
                self._registered = True
        except REDIS_UNREACHABLE as exc:
            self._fall_back(now, exc)
            return
        if self._redis_down:
            self._redis_down = False
            _log.warning("circuit breaker state shared through Redis again", breaker=self.name)
        self._loaded = True
        if self._redis_clock:  # the claim was made on the clock before this correction
            self._fresh_until = now + self._refresh_interval
        else:
            self._fresh_until = max(self._fresh_until, now + self._refresh_interval)
        self._adopt(record)
        await self._report_success()  # a success other processes missed, if any

    def _fall_back(self, now: float, exc: BaseException) -> None:
        self._fresh_until = now + self._redis_retry_interval
        if not self._redis_down:
            self._redis_down = True
            _log.warning(
                "circuit breaker cannot reach Redis; using local state",
                breaker=self.name,
                error=f"{type(exc).__name__}: {exc}",
            )

    def _adopt(self, record: BreakerRecord) -> None:
        self._record = record
        if record.state is not self._shown_state:
            self._shown_state = record.state
            events.emit(CircuitStateChanged(self.name, record.state))
