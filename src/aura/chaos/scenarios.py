"""The chaos scenarios: a bounded load on the real stack with one fault injected for real.

Each scenario imports catalog records through the gateway (outbox, RabbitMQ), lets a real
prefork worker (2 processes) ingest and enrich them against the LLM simulator, injects its
fault while that runs, and ends with an accounting. It passes only when nothing is lost,
nothing is doubled, and every message met the fate the scenario expects.

Times are scaled through Settings (the environment the worker reads), never by patching
code: see ``BASE_ENVIRONMENT`` and each scenario's ``environment``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from aura.catalog import parse_product
from aura.config import get_settings
from aura.demo.report import DemoReport
from aura.demo.runner import ImportRun, _environment, _logs_to, catalog_records
from aura.errors import ConfigurationError, InvalidInputError
from aura.llm import Faults, LLMSimulator

__all__ = ["SCENARIOS", "ChaosResult", "run_scenario"]

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


@dataclass
class ChaosResult:
    scenario: str
    passed: bool
    sent: int
    committed: int  # products written once and enriched once
    dead_lettered: dict[str, int]
    duplicates: int
    lost: int
    retries: int
    deferrals: int
    breaker_opens: int
    elapsed_s: float
    throughput_per_s: float
    latency_p50_s: float
    latency_p99_s: float
    failures: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def valid_records(count: int) -> list[str]:
    """``count`` well-formed records from the bundled catalog."""
    good: list[str] = []
    for record in catalog_records(int(count * 1.1) + 40):
        try:
            parse_product(json.loads(record))
        except (ValueError, InvalidInputError):
            continue
        good.append(record)
        if len(good) == count:
            return good
    raise AssertionError("the bundled catalog ran out of valid records")  # pragma: no cover


class ChaosRun(ImportRun):
    """A scenario: the records it sends, its fault, what it expects."""

    name: ClassVar[str]
    summary: ClassVar[str]
    default_products: ClassVar[int] = 200
    faults: ClassVar[Faults] = Faults()
    environment: ClassVar[dict[str, str]] = {}
    worker_module_name: ClassVar[str] = "aura.worker.tasks"

    details: dict[str, Any]

    @classmethod
    def make_records(cls, products: int) -> list[str]:
        return valid_records(products)

    def expect(self, report: DemoReport) -> list[str]:
        """What this scenario requires beyond lost = duplicates = 0 (failures, if any)."""
        return _all_enriched(report, self.records)

    # helpers for faults that run beside the load
    def start_beside(self, fault: Callable[[], Any]) -> None:
        self._beside = asyncio.get_running_loop().create_task(asyncio.to_thread(fault))

    async def stop_beside(self) -> None:
        self._stop = True
        task = getattr(self, "_beside", None)
        if task is not None:
            await task

    async def on_settled(self) -> None:
        await self.stop_beside()  # a fault running beside the load ends with it

    @property
    def stopping(self) -> bool:
        return getattr(self, "_stop", False)


def _all_enriched(report: DemoReport, records: list[str]) -> list[str]:
    failures = []
    if report.enriched != len(records):
        failures.append(f"enriched {report.enriched} of {len(records)}")
    if report.dead_lettered:
        failures.append(f"unexpected dead letters: {report.dead_lettered}")
    return failures


# 1 ----------------------------------------------------------------------------------
MALFORMED = [
    '{"title": "Broken JSON", "variants": [',  # bad JSON
    '{"title": "Lone surrogate \\udcff", "variants": [{"sku": "BAD-ENC", "price": "1"}]}',
    '{"brand": "No title", "variants": [{"sku": "BAD-MISSING", "price": "1"}]}',  # missing key
    '{"title": "Wrong types", "variants": [{"sku": 7, "price": "free"}]}',
    '{"title": "Not a list", "variants": "SKU-1"}',
    '["an", "array", "not", "an", "object"]',
    '"just a string"',
]


class Poison(ChaosRun):
    name = "poison"
    summary = "malformed messages (bad JSON, bad encoding, missing keys, wrong types) → DLQ"
    default_products = 200

    @classmethod
    def make_records(cls, products: int) -> list[str]:
        good = valid_records(products)
        bad = [MALFORMED[i % len(MALFORMED)] for i in range(max(len(MALFORMED), products // 10))]
        mixed = good + bad
        random.Random(4).shuffle(mixed)
        return mixed

    def expect(self, report: DemoReport) -> list[str]:
        bad = sum(1 for r in self.records if r in MALFORMED)
        failures = []
        if report.dead_lettered != {"poison_pill": bad}:
            failures.append(f"expected {bad} poison_pill dead letters, got {report.dead_lettered}")
        if report.enriched != len(self.records) - bad:
            failures.append(f"enriched {report.enriched} of {len(self.records) - bad}")
        spent = [letter.message_id for letter in self.letters if letter.retries != 0]
        if spent:
            failures.append(f"poison pills that spent retries: {spent[:5]}")
        return failures


# 2 ----------------------------------------------------------------------------------
class FlakyLLM(ChaosRun):
    name = "flaky-llm"
    summary = "30 % of LLM calls fail (5xx, 429, timeouts) → all enriched, retries bounded"
    default_products = 200
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

    def expect(self, report: DemoReport) -> list[str]:
        failures = _all_enriched(report, self.records)
        if report.retries == 0:
            failures.append("no retries: the faults did not happen")
        if report.retries > 8 * len(self.records):
            failures.append(f"{report.retries} retries is over the budget of 8 per product")
        return failures


# 3 ----------------------------------------------------------------------------------
class Outage(ChaosRun):
    name = "llm-outage"
    summary = "an LLM outage longer than the reset timeout → breaker opens, tasks deferred"
    default_products = 200
    faults = Faults(latency=0.005)
    outage_s = 8.0  # 4 x CIRCUIT_BREAKER_RESET_TIMEOUT

    async def on_started(self) -> None:
        # From the start, so the outage meets the load however small the load is.
        self.simulator.start_outage(self.outage_s)

    def expect(self, report: DemoReport) -> list[str]:
        failures = _all_enriched(report, self.records)
        during = self.simulator.outcomes().get("outage", 0)
        self.details["llm_calls_during_outage"] = during
        fail_max = get_settings().circuit_breaker_fail_max
        trials = int(self.outage_s / 2) + 2  # one trial per reset timeout, and slack
        if report.breaker_opens < 1:
            failures.append("the breaker never opened")
        if report.deferrals == 0:
            failures.append("no task was deferred")
        if during > fail_max * 2 + trials * 2:  # two worker processes may each race a few
            failures.append(f"{during} calls reached the provider during the outage")
        return failures


# 4 ----------------------------------------------------------------------------------
class DatabaseKills(ChaosRun):
    name = "db-kill"
    summary = "PostgreSQL connections killed (pg_terminate_backend) while writes are in flight"
    default_products = 200
    environment: ClassVar[dict[str, str]] = {"RETRY_TRACKER_MAX_RETRIES": "10"}
    kill_for_s = 6.0

    async def on_started(self) -> None:
        self.details["backends_killed"] = 0
        self.start_beside(self._kill_backends)

    def _kill_backends(self) -> None:
        url = urlsplit(str(self.settings.database_url).replace("+asyncpg", ""))
        database = url.path.lstrip("/")
        sql = (
            "select count(pg_terminate_backend(pid)) from pg_stat_activity "
            "where datname = current_database() and pid <> pg_backend_pid() "
            "and backend_type = 'client backend'"
        )
        until = time.monotonic() + self.kill_for_s
        while time.monotonic() < until and not self.stopping:
            done = subprocess.run(  # noqa: S603 - psql with our own arguments
                ["psql",  # noqa: S607 "-h", url.hostname or "127.0.0.1", "-p", str(url.port or 5432),
                 "-U", url.username or "postgres", "-d", database, "-Atc", sql],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            if done.returncode == 0 and done.stdout.strip().isdigit():
                self.details["backends_killed"] += int(done.stdout.strip())
            time.sleep(0.3)

    def expect(self, report: DemoReport) -> list[str]:
        failures = _all_enriched(report, self.records)
        if not self.details.get("backends_killed"):
            failures.append("no connection was killed")
        partial = self.details.get("products_without_variants", 0)
        if partial:
            failures.append(f"{partial} products were written without their variants")
        return failures


# 5 ----------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


class WorkerKills(ChaosRun):
    name = "worker-kill"
    summary = "a worker process SIGKILLed mid-task, repeatedly → nothing lost or doubled"
    default_products = 200
    faults = Faults(latency=0.02)  # tasks take long enough to be killed mid-flight
    environment: ClassVar[dict[str, str]] = {"RETRY_TRACKER_MAX_RETRIES": "6"}
    kills = 6

    async def on_started(self) -> None:
        self.details["processes_killed"] = 0
        self.start_beside(self._kill_children)

    def _kill_children(self) -> None:
        assert self.worker_process is not None
        rng = random.Random(5)
        for kill in range(self.kills):
            time.sleep(0.5 if kill == 0 else 1.5)
            if self.stopping:
                return
            children = _children(self.worker_process.pid)
            if children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(rng.choice(children), signal.SIGKILL)
                    self.details["processes_killed"] += 1

    def expect(self, report: DemoReport) -> list[str]:
        failures = _all_enriched(report, self.records)
        if not self.details.get("processes_killed"):
            failures.append("no worker process was killed")
        return failures


class _WorkerKillingMessage(ChaosRun):
    """Besides the records, one message whose every delivery ends with its worker process
    dead (``killing_task``, from ``aura.chaos.tasks``): the run waits for it to reach the
    DLQ as worker_lost, the only dead letter expected."""

    killing_task: ClassVar[str]
    worker_module_name = "aura.chaos.tasks"

    async def on_started(self) -> None:
        self.killing_id = f"{self.killing_task.rsplit('.', 1)[-1]}-{uuid.uuid4().hex}"
        await asyncio.to_thread(
            self.publisher.send_task,
            self.killing_task,
            args=[str(self.tenant_id)],
            task_id=self.killing_id,
            queue="realtime_queue",
        )

    def awaiting_more(self, letters: list[Any]) -> bool:
        return not any(letter.message_id == self.killing_id for letter in letters)

    def expect(self, report: DemoReport) -> list[str]:
        failures = []
        if report.enriched != len(self.records):
            failures.append(f"enriched {report.enriched} of {len(self.records)}")
        if report.dead_lettered != {"worker_lost": 1}:
            failures.append(
                f"expected {self.killing_task} as one worker_lost, got {report.dead_lettered}"
            )
        return failures


# 6 ----------------------------------------------------------------------------------
class HangingTasks(_WorkerKillingMessage):
    name = "hanging"
    summary = "hanging tasks → soft limit (cancelled, retried), hard limit (killed, recycled)"
    default_products = 100
    faults = Faults(latency=0.005, hang_rate=0.1, hang_seconds=6.0)
    killing_task = "aura.chaos.stubborn"  # swallows the soft limit: killed at the hard one
    # The soft limit, not the HTTP client, must end the hanging calls here.
    environment: ClassVar[dict[str, str]] = {
        "CELERY_TASK_SOFT_TIME_LIMIT": "2",
        "CELERY_TASK_HARD_TIME_LIMIT": "4",
        "LLM_READ_TIMEOUT": "30",
        "LLM_CALL_DEADLINE": "30",
    }

    def expect(self, report: DemoReport) -> list[str]:
        failures = super().expect(report)
        if self.details.get("soft_timeouts", 0) == 0:
            failures.append("no task reached the soft time limit")
        if self.details.get("hard_timeouts", 0) == 0:
            failures.append("no process was killed at the hard time limit")
        return failures


# 7 ----------------------------------------------------------------------------------
class Killer(_WorkerKillingMessage):
    name = "killer"
    summary = "a message that kills its worker every time → DLQ after bounded deliveries"
    default_products = 100
    killing_task = "aura.chaos.crash"  # SIGKILLs its own process


# 8 ----------------------------------------------------------------------------------
REDIS_START = [
    "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
    "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
    "--logfile", "/var/log/redis/ci.log",
]  # fmt: skip


class RedisRestart(ChaosRun):
    name = "redis-restart"
    summary = "Redis restarted mid-run (its state lost) → processing continues, nothing loops"
    default_products = 200
    # Slow answers and a few failures: retries and the breaker's state live in Redis.
    faults = Faults(latency=0.1, error_rate=0.1, error_statuses=(503,), retry_after=1.0)
    environment: ClassVar[dict[str, str]] = {"RETRY_TRACKER_MAX_RETRIES": "8"}

    async def on_started(self) -> None:
        def restart() -> None:
            time.sleep(0.5)  # ingest under way, enrichment starting
            self.details["redis_down_s"] = _restart_redis()

        self.start_beside(restart)

    def expect(self, report: DemoReport) -> list[str]:
        failures = _all_enriched(report, self.records)
        if "redis_down_s" not in self.details:
            failures.append("Redis was never restarted")
        return failures


def _run_tool(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """One of the machine's service tools (redis-cli, rabbitmqctl), found on PATH."""
    return subprocess.run(  # noqa: S603 - fixed tool names, our own arguments
        list(command), capture_output=True, text=True, timeout=60, check=check
    )


def _restart_redis() -> float:
    """Stop the local Redis (no save) and start it again with this machine's command."""
    if shutil.which("redis-server") is None:
        raise ConfigurationError("redis-server is not installed here: cannot restart Redis")
    started = time.monotonic()
    _run_tool("redis-cli", "-p", "6379", "shutdown", "nosave", check=False)
    time.sleep(1.0)  # down for a while, as a real restart is
    _run_tool(*REDIS_START)
    deadline = time.monotonic() + 30
    while _run_tool("redis-cli", "-p", "6379", "ping", check=False).stdout.strip() != "PONG":
        if time.monotonic() > deadline:
            raise ConfigurationError("Redis did not come back within 30 s")
        time.sleep(0.1)
    return round(time.monotonic() - started, 2)


# 9 ----------------------------------------------------------------------------------
class BrokerConnectionsClosed(ChaosRun):
    name = "rabbitmq-close"
    summary = "RabbitMQ closes every connection mid-run → workers, gateway reconnect"
    default_products = 200
    faults = Faults(latency=0.01)

    def first_records(self) -> list[str]:
        return self.records[: len(self.records) // 2]

    async def on_tick(self, counts: Any) -> None:
        closes = self.details.setdefault("connections_closed", 0)
        if closes == 0 and counts.done >= len(self.records) * 0.2:
            await asyncio.to_thread(self._close_all)
            # The gateway's publisher lost its connection too: the rest goes through it.
            await self.post_import(self.records[len(self.records) // 2 :])
        elif closes == 1 and counts.enriched >= len(self.records) * 0.5:
            await asyncio.to_thread(self._close_all)

    def awaiting_more(self, letters: list[Any]) -> bool:
        return int(self.details.get("connections_closed", 0)) < 2

    def _close_all(self) -> None:
        vhost = urlsplit(str(self.settings.celery_broker_url)).path.lstrip("/") or "/"
        _run_tool("rabbitmqctl", "close_all_connections", "-p", vhost, "aura chaos")
        self.details["connections_closed"] += 1

    def expect(self, report: DemoReport) -> list[str]:
        failures = _all_enriched(report, self.records)
        if self.details.get("connections_closed", 0) < 2:
            failures.append("the broker's connections were not closed twice")
        return failures


# 10 ---------------------------------------------------------------------------------
class Load(ChaosRun):
    name = "load"
    summary = "10,000 records through the gateway with 2 worker processes: rate and latency"
    default_products = 10_000
    faults = Faults()

    def expect(self, report: DemoReport) -> list[str]:
        self.details["messages_per_s"] = round(2 * report.enriched / report.elapsed_s, 1)
        return _all_enriched(report, self.records)


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
        BrokerConnectionsClosed,
        Load,
    )
}


def run_scenario(name: str, *, products: int | None = None) -> ChaosResult:
    """Run one scenario on the real services (DATABASE_URL, REDIS_URL, CELERY_BROKER_URL)."""
    if name not in SCENARIOS:
        raise InvalidInputError(
            f"unknown scenario {name!r}; expected one of {', '.join(SCENARIOS)}", field="name"
        )
    settings = get_settings()
    if not (settings.database_url and settings.redis_url and settings.celery_broker_url):
        raise ConfigurationError(
            "aura chaos runs on the real services: set DATABASE_URL, REDIS_URL and "
            "CELERY_BROKER_URL"
        )
    if settings.database_url.startswith("sqlite"):
        raise ConfigurationError("aura chaos needs PostgreSQL in DATABASE_URL, not SQLite")
    scenario = SCENARIOS[name]
    count = products or scenario.default_products
    if not 1 <= count <= 20_000:
        raise InvalidInputError(
            f"--products must be between 1 and 20000, got {count}", field="products"
        )
    records = scenario.make_records(count)
    log_path = Path(".aura", f"chaos-{name}.log").resolve()
    log_path.parent.mkdir(exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix=f"aura-chaos-{name}-") as scratch,
        _logs_to(log_path),
        LLMSimulator(scenario.faults, seed=11).running_in_thread() as simulator,
        _environment(
            {**BASE_ENVIRONMENT, **scenario.environment, "LLM_BASE_URL": simulator.base_url}
        ),
    ):
        run = scenario(
            records,
            f"chaos-{name}",
            simulator,
            Path(scratch),
            log_path,
            embedded=False,
            settle_limit=300.0,
            worker_module=scenario.worker_module_name,
        )
        run.details = {}
        report = asyncio.run(_run_and_inspect(run))
        failures = []
        if report.lost:
            failures.append(f"lost {report.lost}")
        if report.duplicates:
            failures.append(f"duplicates {report.duplicates}")
        failures += run.expect(report)
    return ChaosResult(
        scenario=name,
        passed=not failures,
        sent=len(records),
        committed=report.enriched,
        dead_lettered=report.dead_lettered,
        duplicates=report.duplicates,
        lost=report.lost,
        retries=report.retries,
        deferrals=report.deferrals,
        breaker_opens=report.breaker_opens,
        elapsed_s=report.elapsed_s,
        throughput_per_s=report.throughput_per_s,
        latency_p50_s=report.latency_p50_s,
        latency_p99_s=report.latency_p99_s,
        failures=failures,
        details=run.details,
    )


async def _run_and_inspect(run: ChaosRun) -> DemoReport:
    report = await run.run()
    registry = run._registry()
    from aura.demo.runner import _metric_total

    run.details["soft_timeouts"] = _metric_total(
        registry, "celery_task_timeouts_total", kind="soft"
    )
    run.details["hard_timeouts"] = _metric_total(
        registry, "celery_task_timeouts_total", kind="hard"
    )
    run.details["network_rollbacks"] = _metric_total(
        registry, "database_transaction_rollbacks_total", reason="network_error"
    )
    run.details["products_without_variants"] = await _products_without_variants(run)
    return report


async def _products_without_variants(run: ChaosRun) -> int:
    from sqlalchemy import func, select

    from aura.db import Database, Product, Variant

    database = Database.from_settings(run.settings)
    try:
        async with database.session() as session:
            orphans = await session.scalar(
                select(func.count())
                .select_from(Product)
                .where(
                    Product.tenant_id == run.tenant_id,
                    ~select(Variant.id).where(Variant.product_id == Product.id).exists(),
                )
            )
        return int(orphans or 0)
    finally:
        await database.dispose()
