"""The network scenarios: the worker reaches its services through TCP proxies the run
owns (``aura.chaos.proxy``), and the proxies break the network.

    scenario          fault (the worker's and the outbox relay's connections; the
                      gateway's HTTP side and the run's bookkeeping stay direct)
    partition-db      PostgreSQL traffic held for 10 s, then flowing again
    partition-broker  RabbitMQ traffic (the worker's and the relay's) held for 10 s, half
                      the records posted in it, then flowing again
    net-cut           every connection to all four services reset, new ones refused 2 s,
                      three times
    net-slow          200 ms per chunk each way and 256 KB/s, all four services, 15 s
    commit-cut        five commits reach PostgreSQL and commit (a COMMIT, or a worker's
                      one-statement write in autocommit); their replies are cut with the
                      connection, so the worker cannot know (the inbox makes its retry
                      safe: the retry finds its row, a duplicate delivery)

A hold or a reset can cost an LLM call made twice (an enrichment whose write hung past its
soft limit, or whose answer was reset on the way): each scenario bounds those extra calls
by the faults that explain them.
"""

from __future__ import annotations

import asyncio
import time
from typing import ClassVar

from aura.chaos.accounting import Accounting
from aura.chaos.expectations import all_committed, extra_calls
from aura.chaos.run import ChaosRun
from aura.llm import Faults

__all__ = [
    "CommitReplyCut",
    "ConnectionsCut",
    "PartitionBroker",
    "PartitionDatabase",
    "SlowNetwork",
]


class _NetworkFault(ChaosRun):
    """The worker reaches ``proxied`` through the run's proxies; ``heal`` restores them."""

    proxied: ClassVar[tuple[str, ...]] = ("postgres", "rabbitmq", "redis", "llm")
    faults = Faults(latency=0.05)  # tasks in flight when the network breaks
    environment: ClassVar[dict[str, str]] = {"RETRY_TRACKER_MAX_RETRIES": "8"}

    async def heal(self) -> None:
        if self.network is not None:
            await asyncio.to_thread(self.network.heal)

    def stat(self, key: str) -> int:
        """A proxy counter (``ProxyStats``), summed over the run's proxies."""
        return sum(int(getattr(proxy.stats, key)) for proxy in self.proxies.values())


class _Partition(_NetworkFault):
    partitioned: ClassVar[str]
    partition_s: ClassVar[float] = 10.0
    expected_fates = (
        "all committed once; the partition held the worker's traffic; extra LLM calls at "
        "most one per timed-out or rolled-back task"
    )

    async def fault(self) -> None:
        await asyncio.to_thread(self.proxies[self.partitioned].partition)
        await asyncio.sleep(self.partition_s)

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        failures = all_committed(accounting, self.records)
        self.details["held_chunks"] = held = self.stat("held_chunks")
        if not held:
            failures.append("the partition held none of the worker's traffic")
        # A task whose enrichment hung on the database past its soft limit calls again.
        redone = metrics["soft_timeouts"] + metrics["network_rollbacks"]
        return failures + extra_calls(accounting, redone)


class PartitionDatabase(_Partition):
    name = "partition-db"
    summary = "the worker partitioned from PostgreSQL for 10 s (packets held), then restored"
    proxied = ("postgres",)
    partitioned = "postgres"


class PartitionBroker(_Partition):
    """Half the records go in before the partition, half during it: the gateway accepts
    them (its HTTP side and outbox rows are direct) and the relay's publishes hang in
    the partition with the worker's acks, until it heals."""

    name = "partition-broker"
    summary = "the worker and the relay partitioned from RabbitMQ for 10 s, then restored"
    proxied = ("rabbitmq",)
    partitioned = "rabbitmq"

    def first_records(self) -> list[str]:
        return self.records[: len(self.records) // 2]

    async def fault(self) -> None:
        await asyncio.to_thread(self.proxies[self.partitioned].partition)
        started = time.monotonic()
        await self.post_import(self.records[len(self.records) // 2 :])
        await asyncio.sleep(max(0.0, self.partition_s - (time.monotonic() - started)))


class ConnectionsCut(_NetworkFault):
    name = "net-cut"
    summary = "every worker connection (PostgreSQL, RabbitMQ, Redis, LLM) reset, 3 times"
    expected_fates = (
        "all committed once; connections reset > 0; extra LLM calls at most one per reset "
        "LLM connection or rolled-back task"
    )
    cuts = 3
    refused_s = 2.0

    async def fault(self) -> None:
        for _ in range(self.cuts):
            await asyncio.sleep(0.5 + self.rng.random())
            for proxy in self.proxies.values():
                await asyncio.to_thread(proxy.cut)
            await asyncio.sleep(self.refused_s)
            await self.heal()

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        failures = all_committed(accounting, self.records)
        self.details["connections_reset"] = reset = self.stat("reset")
        if not reset:
            failures.append("no open connection was reset")
        # A reset LLM connection loses an answer the provider gave (and counted).
        llm_reset = self.proxies["llm"].stats.reset
        return failures + extra_calls(accounting, llm_reset + metrics["network_rollbacks"])


class SlowNetwork(_NetworkFault):
    name = "net-slow"
    summary = "200 ms added to every packet each way, 256 KB/s per direction, for 15 s"
    expected_fates = (
        "all committed once; delayed packets > 0; extra LLM calls at most one per soft timeout"
    )
    latency_s = 0.2
    bandwidth = 256 * 1024
    window_s = 15.0

    async def fault(self) -> None:
        for proxy in self.proxies.values():
            await asyncio.to_thread(proxy.slow, self.latency_s, self.bandwidth)
        await asyncio.sleep(self.window_s)

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        failures = all_committed(accounting, self.records)
        self.details["delayed_chunks"] = delayed = self.stat("delayed_chunks")
        if not delayed:
            failures.append("no packet was delayed")
        return failures + extra_calls(accounting, metrics["soft_timeouts"])


class CommitReplyCut(_NetworkFault):
    name = "commit-cut"
    summary = "the connection cut between a commit and its reply, 5 times (committed, unknown)"
    expected_fates = (
        "all committed once; each cut's retry finds its inbox row (duplicate delivery); "
        "at most one extra LLM call per cut"
    )
    proxied = ("postgres",)
    cuts = 5
    window_s = 30.0

    async def fault(self) -> None:
        proxy = self.proxies["postgres"]
        await asyncio.to_thread(proxy.cut_commit_replies, self.cuts)
        until = time.monotonic() + self.window_s
        marked = 0  # each cut a mark on the report's timeline (within 0.1 s of it)
        while marked < self.cuts and time.monotonic() < until:
            await asyncio.sleep(0.1)  # a counter on another thread's loop
            cut = proxy.stats.commit_replies_cut
            for number in range(marked + 1, min(cut, self.cuts) + 1):
                self.recorder.mark(f"COMMIT reply cut ({number} of {self.cuts})")
            marked = max(marked, cut)

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        failures = all_committed(accounting, self.records)
        self.details["commit_replies_cut"] = cut = self.stat("commit_replies_cut")
        if not cut:
            failures.append("no COMMIT reply was cut")
        if metrics["duplicate_deliveries"] == 0:
            failures.append("no retry found its message committed: the cut went unseen")
        return failures + extra_calls(accounting, cut)
