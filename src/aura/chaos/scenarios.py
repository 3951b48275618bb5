"""The chaos scenarios: a bounded load on the real stack with one fault injected for real.

Each scenario imports catalog records through the gateway (outbox, RabbitMQ), lets a real
worker (the async pool; prefork for the three that kill its processes; under a
supervisor) ingest and enrich them against the LLM simulator, injects its fault once the
worker consumes, heals, drains, and counts every message (``aura.chaos.accounting``).
It passes only when nothing is lost, stranded, doubled or both committed and
dead-lettered, and every message met the fate the scenario expects (``expected_fates``,
the README's table). This module holds the list (``SCENARIOS``, in the README's order)
and runs one (``run_scenario``); the scenarios live by what they break:

    message_faults     poison, malformed, reused-id, large-record
    llm_faults         flaky-llm, llm-outage
    service_faults     db-kill, redis-restart, redis-down, rabbitmq-close
    process_faults     worker-kill, hanging, killer
    network            the network between the worker and each service
    shared_state       what the fleet shares through Redis (its memory, its clock)
    dependency_faults  a dependency running out (database connections, broker memory)
    ha_rabbitmq        a node of a 3-node RabbitMQ cluster lost (the run's own cluster)
    ha_redis           the Redis primary lost under Sentinel (the run's own group)
    ha_postgres        the PostgreSQL primary crashed, its replica promoted (the run's own)

Everything a scenario breaks is the run's own (``aura.chaos.resources``): its database,
its vhost, its ``redis-server``; the high-availability scenarios start whole clusters of
their own (three RabbitMQ nodes, a Sentinel group, a primary and a replica). Times are
scaled through Settings (the environment the worker reads), never by patching code.
``seed`` makes a run's choices repeatable. With ``report``, the run samples itself and
writes its timeline (``aura.timeline``) there: ``<name>.html`` beside ``<name>.json``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import tempfile
from pathlib import Path
from typing import Any

from aura.chaos.accounting import Accounting
from aura.chaos.dependency_faults import BrokerBlocked, DatabaseExhausted
from aura.chaos.expectations import all_committed, extra_calls
from aura.chaos.ha_postgres import PostgresFailover
from aura.chaos.ha_rabbitmq import RabbitMQNodeKill
from aura.chaos.ha_redis import RedisFailover
from aura.chaos.llm_faults import FlakyLLM, Outage
from aura.chaos.message_faults import LargeRecord, MalformedMessages, Poison, ReusedMessageId
from aura.chaos.network import (
    CommitReplyCut,
    ConnectionsCut,
    PartitionBroker,
    PartitionDatabase,
    SlowNetwork,
)
from aura.chaos.process_faults import HangingTasks, Killer, WorkerKills
from aura.chaos.records import MALFORMED_RECORDS, malformed_messages, valid_records
from aura.chaos.resources import owned_stack
from aura.chaos.result import ChaosResult, chaos_report
from aura.chaos.run import ChaosRun
from aura.chaos.service_faults import (
    BrokerConnectionsClosed,
    DatabaseKills,
    RedisDown,
    RedisRestart,
)
from aura.chaos.shared_state import ClockSkew, RedisOutOfMemory
from aura.config import get_settings
from aura.demo.harness import environment, logs_to
from aura.errors import ConfigurationError, InvalidInputError
from aura.llm import LLMSimulator
from aura.timeline import write_report
from aura.timeline.series import table_rows

__all__ = [
    "MALFORMED_RECORDS",
    "SCENARIOS",
    "ChaosResult",
    "Load",
    "chaos_report",
    "malformed_messages",
    "run_scenario",
    "valid_records",
]


# Scaled for runs of tens of seconds; the seed's values stay the defaults elsewhere.
BASE_ENVIRONMENT = {
    "LLM_READ_TIMEOUT": "1",
    "LLM_CALL_DEADLINE": "2.5",
    "CIRCUIT_BREAKER_RESET_TIMEOUT": "2",
    "CELERY_TASK_SOFT_TIME_LIMIT": "10",
    "CELERY_TASK_HARD_TIME_LIMIT": "15",
    "OUTBOX_RELAY_INTERVAL": "1",
    "OUTBOX_RELAY_MIN_AGE": "3",
    "LOG_LEVEL": "WARNING",
}
MAX_PRODUCTS = 20_000


# 14 ---------------------------------------------------------------------------------
class Load(ChaosRun):
    name = "load"
    summary = "10,000 records through the gateway: rate, latency, worker CPU per record"
    expected_fates = "all committed once; no extra LLM call"
    default_products = 10_000

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        elapsed = float(self.details.get("elapsed_s") or 1.0)
        self.details["messages_per_s"] = round(accounting.committed_once / elapsed, 1)
        return all_committed(accounting, self.records) + extra_calls(accounting)


SCENARIOS: dict[str, type[ChaosRun]] = {
    scenario.name: scenario
    for scenario in (
        Poison,
        FlakyLLM,
        Outage,
        DatabaseKills,
        WorkerKills,
        HangingTasks,
        Killer,
        RedisRestart,
        RedisDown,
        BrokerConnectionsClosed,
        MalformedMessages,
        ReusedMessageId,
        LargeRecord,
        Load,
        PartitionDatabase,
        PartitionBroker,
        ConnectionsCut,
        SlowNetwork,
        CommitReplyCut,
        RedisOutOfMemory,
        ClockSkew,
        DatabaseExhausted,
        BrokerBlocked,
        RabbitMQNodeKill,
        RedisFailover,
        PostgresFailover,
    )
}


def run_scenario(
    name: str | type[ChaosRun],
    *,
    products: int | None = None,
    seed: int | None = None,
    llm_latency: float | None = None,
    concurrency: int | None = None,
    report: Path | None = None,
) -> ChaosResult:
    """Run one scenario on its own stack, made on the servers DATABASE_URL and
    CELERY_BROKER_URL name (a private redis-server stands for Redis). ``llm_latency``
    replaces the scenario's simulated LLM latency; ``concurrency`` its worker's tasks in
    flight (async pool) or processes (prefork); ``report``: a directory for its
    timeline report."""
    if isinstance(name, str) and name not in SCENARIOS:
        raise InvalidInputError(
            f"unknown scenario {name!r}; expected one of {', '.join(SCENARIOS)}", field="name"
        )
    scenario = SCENARIOS[name] if isinstance(name, str) else name
    settings = get_settings()
    if not (settings.database_url and settings.celery_broker_url):
        raise ConfigurationError(
            "aura chaos runs on the real services: set DATABASE_URL and CELERY_BROKER_URL "
            "(it makes its own database and vhost there, and runs its own redis-server)"
        )
    if settings.database_url.startswith("sqlite"):
        raise ConfigurationError("aura chaos needs PostgreSQL in DATABASE_URL, not SQLite")
    count = products or scenario.default_products
    if not 1 <= count <= MAX_PRODUCTS:
        raise InvalidInputError(
            f"--products must be between 1 and {MAX_PRODUCTS}, got {count}", field="products"
        )
    seed = seed if seed is not None else int.from_bytes(os.urandom(3), "big")
    faults = scenario.faults
    if llm_latency is not None:
        faults = dataclasses.replace(faults, latency=llm_latency)

    records = scenario.make_records(count, random.Random(seed))
    log_path = Path(".aura", f"chaos-{scenario.name}.log").resolve()
    log_path.parent.mkdir(exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix=f"aura-chaos-{scenario.name}-") as scratch,
        logs_to(log_path),
        LLMSimulator(faults, seed=seed).running_in_thread() as simulator,
    ):
        return asyncio.run(
            _run(
                scenario,
                records,
                simulator,
                Path(scratch),
                log_path,
                seed,
                settings,
                concurrency,
                report,
            )
        )


async def _run(
    scenario: type[ChaosRun],
    records: list[str],
    simulator: LLMSimulator,
    scratch: Path,
    log_path: Path,
    seed: int,
    settings: Any,
    concurrency: int | None,
    report: Path | None = None,
) -> ChaosResult:
    (scratch / "redis").mkdir()
    async with owned_stack(
        str(settings.database_url),
        str(settings.celery_broker_url),
        scratch / "redis",
        own_broker=scenario.own_broker,
        own_redis=scenario.own_redis,
        own_database=scenario.own_database,
    ) as stack:
        values = {
            **BASE_ENVIRONMENT,
            **scenario.environment,
            "LLM_BASE_URL": simulator.base_url,
            "DATABASE_URL": stack.database_url,
            "CELERY_BROKER_URL": stack.broker_url,
            "REDIS_URL": stack.redis_url,
        }
        with environment(values):
            run = scenario(
                records, simulator, scratch, log_path, stack, seed, concurrency=concurrency
            )
            run.recorder.enabled = report is not None
            accounting, metrics = await run.run_and_count()
            failures = [f"drain: {run.details['drain']}"] if "drain" in run.details else []
            failures += accounting.failures() + run.expect(accounting, metrics)
    run.details["database"], run.details["vhost"] = stack.database, stack.vhost
    result = ChaosResult(
        scenario=scenario.name,
        passed=not failures,
        seed=seed,
        sent=len(records),
        accounting=accounting.as_dict(),
        metrics=metrics,
        failures=failures,
        details=run.details,
    )
    if report is not None:
        rows = {"sent": result.sent, **result.accounting, **result.metrics, **result.details}
        timeline = run.recorder.timeline(
            scenario.name,
            summary=scenario.summary,
            seed=seed,
            passed=result.passed,
            table=table_rows(rows),
            failures=failures,
        )
        write_report(report, timeline)
    return result
