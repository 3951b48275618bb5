"""redis-failover: the run's Redis is a Sentinel group of its own (``own_redis =
"sentinel"``: ``aura.chaos.redis_sentinel.PrivateSentinelRedis``, a primary, a replica and
three sentinels), and every Redis user -- the worker's retry and deferral counters, its
LLM client's breaker, rate limiter and token budgets, the gateway's readiness check -- is
given the one ``redis+sentinel://`` URL. Once the worker is steady, the primary is
SIGKILLed; the sentinels promote the replica; the old primary is started again on its
port (empty, as a crashed server without persistence comes back) and the sentinels make
it a replica of the new master.

What it proves, beyond the accounting's invariants: every record committed once, none
dead-lettered -- by Aura or by the broker (the issue's failure: counter writes raising
``READONLY`` escaped the task, and the broker dead-lettered 6,218 of 6,700 products with
no Aura reason) -- and the worker's throughput (enrichments committed per second) back to
>= 90 % of its rate before the kill within 10 s of it. Measured: the kill to the new
master named, to the old primary following it; records/s before, through the failover
and through the whole fault; a per-second timeline around the kill.

Why throughput barely moves: Redis is an optimisation here (``aura.redis_errors``). While
no master is named, each Redis call fails at once (a refused connection, then
``MasterNotFoundError``) and its user falls back -- the counters to the delivery's own
count, the breaker to local state, the limiter and the budgets let the call through --
and the first call after the promotion reaches the new master (``aura.redis_connect``).

Accepted, written down: what the old primary had not yet replicated is lost with it
(replication is asynchronous): a retry count, a breaker's record or a budget's tokens of
the last instant before the kill. Each is an optimisation; a message's fate never rests
on it. The throughput is sampled from the run's own database every 0.5 s
(``ThroughputSampler``), on the run's monotonic clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any, ClassVar

from aura.chaos.accounting import Accounting
from aura.chaos.expectations import all_committed
from aura.chaos.redis_sentinel import PrivateSentinelRedis
from aura.chaos.run import ChaosRun
from aura.chaos.shared_state import broker_dead_lettered
from aura.chaos.throughput import around, database_clock, enriched_stamps
from aura.db import Database
from aura.llm import Faults

__all__ = ["RedisFailover"]

# What each Redis user logs when it falls back (once per outage, per process)
_FALLBACK_LOGS = ("cannot reach Redis", "cannot use Redis", "could not clear the retry counters")


class RedisFailover(ChaosRun):
    name = "redis-failover"
    summary = "the run's own Redis primary killed (Sentinel), the old one back as a replica"
    expected_fates = (
        "all committed once, none dead-lettered (none by the broker); throughput back to "
        ">= 90 % of its rate before the kill within 10 s of it"
    )
    own_redis: ClassVar[str] = "sentinel"
    # About 22 records/s through 12 slots, so 600 last past the fault (the old primary is
    # a replica again some 12 s after the kill); a few 503s, so the retry counters are
    # written through it; every LLM call passes the Redis rate limiter and a tenant budget
    # (both far from binding): every Redis user is in play.
    worker_slots = 12
    faults = Faults(latency=0.4, jitter=0.2, error_rate=0.03, error_statuses=(503,))
    environment: ClassVar[dict[str, str]] = {
        "RETRY_TRACKER_MAX_RETRIES": "8",
        "CIRCUIT_BREAKER_FAIL_MAX": "1000",  # the 503s must not open it: the rate is the point
        "LLM_RATE_LIMIT_RPM": "1000000",
        "LLM_TENANT_BUDGET_DEFAULT": "1000000000/100000000000",
    }
    default_products = 600
    steady_s = 6.0  # after the worker's first fate: the baseline is the last 4 s of it
    baseline_s = 4.0
    observe_s = 13.0  # sampled after the kill: the 10 s bound and a window past it
    recover_within_s = 10.0
    share = 0.9
    window_s = 3.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.killed_at: float | None = None  # the database's clock (the stamps')
        self.moments: dict[str, float] = {}  # seconds after the kill
        self._log_offset = 0

    def _group(self) -> PrivateSentinelRedis:
        group = self.stack.redis
        assert isinstance(group, PrivateSentinelRedis), "redis-failover runs on its own group"
        return group

    async def fault(self) -> None:
        group = self._group()
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        database = Database.from_settings(self.settings)
        try:
            await asyncio.sleep(self.steady_s)
            self.killed_at = await database_clock(database)
            killed = time.monotonic()
            self.details["primary_killed"] = await asyncio.to_thread(group.kill_primary)
            new = await asyncio.to_thread(group.wait_for_new_primary, 30.0)
            self.moments["new_master"] = time.monotonic() - killed
            self.details["new_primary"] = new
            self.details["kill_to_new_master_s"] = round(self.moments["new_master"], 2)
            await asyncio.to_thread(group.restart_old_primary, 60.0)
            self.moments["old_primary_back"] = time.monotonic() - killed
            self.details["kill_to_old_primary_replica_s"] = round(
                self.moments["old_primary_back"], 2
            )
            self.details["old_primary_role"] = group.role(int(self.details["primary_killed"]))
            await asyncio.sleep(max(0.0, killed + self.observe_s - time.monotonic()))
        finally:
            await database.dispose()

    async def _measure(self, database: Database) -> None:
        """The throughput around the kill, from the enrichments' own timestamps."""
        killed = self.killed_at
        if killed is None or self.tenant_id is None:
            return
        stamps = await enriched_stamps(database, self.tenant_id)
        back = killed + self.moments.get("old_primary_back", self.observe_s)
        figures = around(
            stamps, killed, back, baseline_s=self.baseline_s, window_s=self.window_s,
            share=self.share,
        )  # fmt: skip
        details = self.details
        details["records_per_s_before_kill"] = figures["records_per_s_before"]
        details["records_per_s_during_fault"] = figures["records_per_s_during_fault"]
        details["throughput_recovered_after_s"] = figures["recovered_after_s"]
        details["records_per_s_timeline"] = figures["records_per_s_timeline"]

    async def heal(self) -> None:
        group = self._group()
        if group.killed is not None:  # a fault cut short: a master named, the old one back
            await asyncio.to_thread(group.wait_for_new_primary, 30.0)
            await asyncio.to_thread(group.restart_old_primary, 60.0)

    async def before_count(self, database: Database) -> None:
        await self._measure(database)
        letters = await asyncio.to_thread(self.read_letters)
        self.details["broker_dead_lettered"] = broker_dead_lettered(letters)
        self.details["redis_users_fell_back"] = self._fallbacks()

    def _fallbacks(self) -> dict[str, int]:
        """The worker's Redis users that fell back since the fault began, by what they
        logged, and how often (its log read from the fault on, bounded)."""
        if not self.log_path.exists():
            return {}
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            lines = log.read(64 * 1024 * 1024).decode("utf-8", "replace").splitlines()
        seen: dict[str, int] = {}
        for line in lines:
            if any(marker in line for marker in _FALLBACK_LOGS):
                with contextlib.suppress(ValueError, AttributeError):
                    event = str(json.loads(line).get("event"))[:80]
                    seen[event] = seen.get(event, 0) + 1
        return seen

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        failures = all_committed(accounting, self.records)
        for key in ("retries", "deferrals", "breaker_opens"):
            self.details[key] = metrics[key]
        if self.details.get("broker_dead_lettered"):
            failures.append(f"{self.details['broker_dead_lettered']} broker-dead-lettered")
        if "kill_to_new_master_s" not in self.details:
            failures.append("the primary was not killed and a new master named")
        if self.details.get("old_primary_role") != "slave":
            failures.append(f"the old primary came back as {self.details.get('old_primary_role')}")
        recovery = self.details.get("throughput_recovered_after_s")
        if recovery is None:
            failures.append(
                f"the throughput never came back to {self.share:.0%} of its rate before the "
                f"kill ({self.details.get('records_per_s_before_kill')} records/s)"
            )
        elif recovery > self.recover_within_s:
            failures.append(
                f"the throughput came back {recovery} s after the kill "
                f"(bound {self.recover_within_s:.0f} s)"
            )
        return failures
