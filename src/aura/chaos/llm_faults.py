"""The scenarios where the LLM provider misbehaves: flaky answers (5xx, 429, hangs) and an
outage longer than the breaker's reset timeout."""

from __future__ import annotations

import asyncio
from typing import ClassVar

from aura.chaos.accounting import Accounting
from aura.chaos.expectations import all_committed, extra_calls
from aura.chaos.run import ChaosRun
from aura.config import get_settings
from aura.llm import Faults

__all__ = ["FlakyLLM", "Outage"]


# 2 ----------------------------------------------------------------------------------
class FlakyLLM(ChaosRun):
    name = "flaky-llm"
    summary = "30 % of LLM calls fail (5xx, 429, timeouts) → all enriched, retries bounded"
    expected_fates = "all committed once; retries > 0 and bounded; no extra LLM call"
    faults = Faults(
        latency=0.005,
        error_rate=0.2,
        error_statuses=(500, 502, 503, 429),
        retry_after=1.0,
        hang_rate=0.1,
        hang_seconds=3.0,
    )
    # At 30 %, four failures in a row (3 retries) happen to 0.8 % of products: the
    # budget is raised so "all enriched" holds; bounded is what is checked.
    environment: ClassVar[dict[str, str]] = {"RETRY_TRACKER_MAX_RETRIES": "8"}

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        failures = all_committed(accounting, self.records)
        if metrics["retries"] == 0:
            failures.append("no retries: the faults did not happen")
        if metrics["retries"] > 8 * len(self.records):
            failures.append(f"{metrics['retries']} retries is over the budget of 8 per product")
        return failures + extra_calls(accounting)


# 3 ----------------------------------------------------------------------------------
class Outage(ChaosRun):
    name = "llm-outage"
    summary = "an LLM outage longer than the reset timeout → breaker opens, tasks deferred"
    expected_fates = "all committed once; breaker opens, deferrals > 0, few calls in the outage"
    faults = Faults(latency=0.005)
    outage_s = 8.0  # 4 x CIRCUIT_BREAKER_RESET_TIMEOUT

    async def fault(self) -> None:
        with self.recorder.window(f"LLM outage ({self.outage_s:g} s)"):
            self.simulator.start_outage(self.outage_s)
            await asyncio.sleep(self.outage_s)

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        failures = all_committed(accounting, self.records)
        during = self.simulator.outcomes().get("outage", 0)
        self.details["llm_calls_during_outage"] = during
        fail_max = get_settings().circuit_breaker_fail_max
        trials = int(self.outage_s / 2) + 2  # one trial per reset timeout, and slack
        if metrics["breaker_opens"] < 1:
            failures.append("the breaker never opened")
        if metrics["deferrals"] == 0:
            failures.append("no task was deferred")
        # The calls in flight when the outage began fail on their own (up to one per
        # task slot), then fail_max more open the breaker, then a trial or two per
        # reset timeout: anything beyond that means the breaker let calls through.
        bound = self.concurrency + fail_max + trials * 2
        self.details["llm_calls_allowed_during_outage"] = bound
        if during > bound:
            failures.append(f"{during} calls reached the provider during the outage")
        return failures
