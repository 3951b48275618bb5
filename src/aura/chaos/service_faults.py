"""The scenarios where a service the worker uses fails under it: PostgreSQL backends killed
mid-transaction, the run's Redis restarted (its state lost) or down, RabbitMQ closing
the run's connections."""

from __future__ import annotations

import asyncio
import time
from typing import ClassVar

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from aura.chaos.accounting import Accounting
from aura.chaos.expectations import all_committed
from aura.chaos.resources import run_tool
from aura.chaos.run import ChaosRun
from aura.llm import Faults

__all__ = ["BrokerConnectionsClosed", "DatabaseKills", "RedisDown", "RedisRestart"]


# 4 ----------------------------------------------------------------------------------
# Backends inside a transaction (a write, or a COMMIT, in flight), never idle ones.
_IN_FLIGHT = (
    "select count(pg_terminate_backend(pid)) from pg_stat_activity "
    "where datname = current_database() and pid <> pg_backend_pid() "
    "and backend_type = 'client backend' and xact_start is not null "
    "and state in ('active', 'idle in transaction')"
)


class DatabaseKills(ChaosRun):
    name = "db-kill"
    summary = "PostgreSQL backends killed while their transactions are in flight"
    expected_fates = "all committed once; network rollbacks > 0, retries > 0, no half-written row"
    faults = Faults(latency=0.01)
    environment: ClassVar[dict[str, str]] = {"RETRY_TRACKER_MAX_RETRIES": "10"}
    window_s = 20.0

    async def fault(self) -> None:
        """Kill in-flight transactions until the worker has seen rollbacks and retried
        (or the window ends): a kill that only finds idle connections proves nothing."""
        self.details["backends_killed"] = 0
        engine = create_async_engine(self.stack.database_url, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as connection:
                until = time.monotonic() + self.window_s
                while time.monotonic() < until:
                    killed = int((await connection.execute(text(_IN_FLIGHT))).scalar() or 0)
                    self.details["backends_killed"] += killed
                    if killed:
                        metrics = await asyncio.to_thread(self._metrics)
                        if metrics["network_rollbacks"] >= 3 and metrics["retries"] >= 1:
                            return
                    await asyncio.sleep(0.02 + self.rng.random() * 0.03)
        finally:
            await engine.dispose()

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        failures = all_committed(accounting, self.records)
        if not self.details.get("backends_killed"):
            failures.append("no in-flight transaction was killed")
        if metrics["network_rollbacks"] == 0:
            failures.append("no network rollback: no transaction failed mid-flight")
        if metrics["retries"] == 0:
            failures.append("no retry after a killed transaction")
        return failures


# 8 ----------------------------------------------------------------------------------
class RedisRestart(ChaosRun):
    name = "redis-restart"
    summary = "the run's own Redis killed and restarted (its state lost) → nothing loops"
    expected_fates = "all committed once"
    # Slow answers and a few failures: retries and the breaker's state live in Redis.
    faults = Faults(latency=0.1, error_rate=0.1, error_statuses=(503,), retry_after=1.0)
    environment: ClassVar[dict[str, str]] = {"RETRY_TRACKER_MAX_RETRIES": "8"}

    async def fault(self) -> None:
        started = time.monotonic()
        with self.recorder.window("Redis killed, restarted empty"):
            await asyncio.to_thread(self.stack.redis.restart, 1.0)
        self.details["redis_down_s"] = round(time.monotonic() - started, 2)


# 9 ----------------------------------------------------------------------------------
class RedisDown(ChaosRun):
    name = "redis-down"
    summary = "the run's own Redis down while retried tasks succeed → committed, never DLQ'd"
    expected_fates = "all committed once; retries > 0; none committed and dead-lettered"
    faults = Faults(latency=0.02, error_rate=0.3, error_statuses=(503,), retry_after=0.5)
    environment: ClassVar[dict[str, str]] = {"RETRY_TRACKER_MAX_RETRIES": "8"}
    down_s = 8.0

    async def fault(self) -> None:
        with self.recorder.window(f"Redis down ({self.down_s:g} s)"):
            await asyncio.to_thread(self.stack.redis.stop)
            self.details["redis_down_s"] = self.down_s
            await asyncio.sleep(self.down_s)

    async def heal(self) -> None:
        if not self.stack.redis.answers():
            await asyncio.to_thread(self.stack.redis.start)

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        failures = all_committed(accounting, self.records)
        if metrics["retries"] == 0:
            failures.append("no retries while Redis was down")
        return failures


# 10 ---------------------------------------------------------------------------------
class BrokerConnectionsClosed(ChaosRun):
    name = "rabbitmq-close"
    summary = "RabbitMQ closes the run's vhost's connections in a loop while tasks run"
    expected_fates = "all committed once; the gateway and the worker reconnect"
    faults = Faults(latency=0.02)
    closes = 4

    def first_records(self) -> list[str]:
        return self.records[: len(self.records) // 2]

    async def fault(self) -> None:
        self.details["connections_closed"] = 0
        for close in range(self.closes):
            await asyncio.to_thread(
                run_tool, "rabbitmqctl", "close_all_connections", "-p", self.stack.vhost,
                "aura chaos",
            )  # fmt: skip
            self.details["connections_closed"] += 1
            if close == 0:  # the gateway's publisher lost its connection too
                await self.post_import(self.records[len(self.records) // 2 :])
            await asyncio.sleep(1.0 + self.rng.random())

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        failures = all_committed(accounting, self.records)
        if self.details.get("connections_closed", 0) < self.closes:
            failures.append(
                f"the connections were closed {self.details.get('connections_closed')} times"
            )
        return failures
