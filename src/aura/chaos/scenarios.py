"""The chaos scenarios: a bounded load on the real stack with one fault injected for real.

Each scenario imports catalog records through the gateway (outbox, RabbitMQ), lets a real
worker (the async pool; prefork for the three that kill its processes; under a
supervisor) ingest and enrich them against the LLM simulator, injects its fault once the
worker consumes, heals, drains, and counts every message (``aura.chaos.accounting``).
It passes only when nothing is lost, stranded, doubled or both committed and
dead-lettered, and every message met the fate the scenario expects (``expected_fates``,
the README's table). The network scenarios are in ``aura.chaos.network``; those on what
the fleet shares through Redis (its memory, its clock) in ``aura.chaos.shared_state``;
a dependency running out (database connections, broker memory) in
``aura.chaos.dependency_faults``.

Everything a scenario breaks is the run's own (``aura.chaos.resources``): its database,
its vhost, its ``redis-server``. Times are scaled through Settings (the environment the
worker reads), never by patching code. ``seed`` makes a run's choices repeatable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from kombu.connection import Connection
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from aura.catalog import parse_product
from aura.chaos.accounting import Accounting, Sent
from aura.chaos.dependency_faults import BrokerBlocked, DatabaseExhausted
from aura.chaos.network import (
    CommitReplyCut,
    ConnectionsCut,
    PartitionBroker,
    PartitionDatabase,
    SlowNetwork,
)
from aura.chaos.resources import owned_stack, run_tool
from aura.chaos.run import ChaosRun, _all_committed, _expect_letters, _extra_calls
from aura.chaos.shared_state import ClockSkew, RedisOutOfMemory
from aura.config import get_settings
from aura.contract import ENRICH_TASK, INGEST_TASK
from aura.demo.runner import _environment, _logs_to, catalog_records
from aura.errors import ConfigurationError, InvalidInputError
from aura.llm import Faults, LLMSimulator
from aura.messaging.topology import BULK_QUEUE, REALTIME_QUEUE, WORK_EXCHANGE

__all__ = ["SCENARIOS", "ChaosResult", "chaos_report", "run_scenario"]

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


@dataclass
class ChaosResult:
    scenario: str
    passed: bool
    seed: int
    sent: int  # records imported through the gateway
    accounting: dict[str, Any]
    metrics: dict[str, int]
    failures: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def crashed(cls, scenario: str, seed: int, exc: BaseException) -> ChaosResult:
        """A scenario that raised instead of ending in an accounting: failed."""
        return cls(
            scenario=scenario,
            passed=False,
            seed=seed,
            sent=0,
            accounting={},
            metrics={},
            failures=[f"crashed: {type(exc).__name__}: {str(exc)[:300]}"],
        )

    def performance(self) -> dict[str, Any]:
        """Throughput, latency, the worker's CPU per record, and the knobs they ran with."""
        keys = (
            "elapsed_s", "records_per_s", "latency_p50_s", "latency_p99_s", "worker_cpu_s",
            "worker_cpu_ms_per_record", "llm_latency_s", "concurrency", "worker_pool",
        )  # fmt: skip
        return {key: self.details.get(key) for key in keys}


def chaos_report(results: list[ChaosResult], elapsed_s: float) -> dict[str, Any]:
    """``aura chaos all --json``: every scenario's accounting and performance, and a verdict."""
    return {
        "passed": all(result.passed for result in results),
        "elapsed_s": round(elapsed_s, 1),
        "scenarios": len(results),
        "failed": [result.scenario for result in results if not result.passed],
        "results": [
            {
                "scenario": result.scenario,
                "passed": result.passed,
                "seed": result.seed,
                "sent": result.sent,
                "failures": result.failures,
                "accounting": result.accounting,
                "performance": result.performance(),
                "metrics": result.metrics,
                "details": result.details,
            }
            for result in results
        ],
    }


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


# 1 ----------------------------------------------------------------------------------
MALFORMED_RECORDS = [
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
    summary = "malformed records (bad JSON, bad encoding, missing keys, wrong types) → DLQ"
    expected_fates = "good records committed once; each malformed one poison_pill, 0 retries"

    @classmethod
    def make_records(cls, products: int, rng: Any) -> list[str]:
        good = valid_records(products)
        count = max(len(MALFORMED_RECORDS), products // 10)
        mixed = good + [MALFORMED_RECORDS[i % len(MALFORMED_RECORDS)] for i in range(count)]
        rng.shuffle(mixed)
        return mixed

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        bad = sum(1 for r in self.records if r in MALFORMED_RECORDS)
        failures = _expect_letters(accounting, len(self.records) - bad, {"poison_pill": bad})
        if metrics["retries"]:
            failures.append(f"{metrics['retries']} retries: poison pills spend none")
        return failures + _extra_calls(accounting)


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
        failures = _all_committed(accounting, self.records)
        if metrics["retries"] == 0:
            failures.append("no retries: the faults did not happen")
        if metrics["retries"] > 8 * len(self.records):
            failures.append(f"{metrics['retries']} retries is over the budget of 8 per product")
        return failures + _extra_calls(accounting)


# 3 ----------------------------------------------------------------------------------
class Outage(ChaosRun):
    name = "llm-outage"
    summary = "an LLM outage longer than the reset timeout → breaker opens, tasks deferred"
    expected_fates = "all committed once; breaker opens, deferrals > 0, few calls in the outage"
    faults = Faults(latency=0.005)
    outage_s = 8.0  # 4 x CIRCUIT_BREAKER_RESET_TIMEOUT

    async def fault(self) -> None:
        self.simulator.start_outage(self.outage_s)
        await asyncio.sleep(self.outage_s)

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        failures = _all_committed(accounting, self.records)
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
        failures = _all_committed(accounting, self.records)
        if not self.details.get("backends_killed"):
            failures.append("no in-flight transaction was killed")
        if metrics["network_rollbacks"] == 0:
            failures.append("no network rollback: no transaction failed mid-flight")
        if metrics["retries"] == 0:
            failures.append("no retry after a killed transaction")
        return failures


# 5 ----------------------------------------------------------------------------------
def _children(pid: int | None) -> list[int]:
    if pid is None:
        return []
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


class WorkerKills(ChaosRun):
    worker_pool = "prefork"  # it kills the pool's children
    name = "worker-kill"
    summary = "a worker process SIGKILLed mid-task, repeatedly → nothing lost or doubled"
    expected_fates = "all committed once; extra LLM calls at most one per kill"
    faults = Faults(latency=0.02)  # tasks take long enough to be killed mid-flight
    environment: ClassVar[dict[str, str]] = {"RETRY_TRACKER_MAX_RETRIES": "6"}
    kills = 6

    async def fault(self) -> None:
        self.details["processes_killed"] = 0
        for _ in range(self.kills):
            await asyncio.sleep(0.5 + self.rng.random())
            children = _children(self.worker_pid)
            if children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.rng.choice(children), signal.SIGKILL)
                    self.details["processes_killed"] += 1

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        failures = _all_committed(accounting, self.records)
        if not self.details.get("processes_killed"):
            failures.append("no worker process was killed")
        return failures + _extra_calls(accounting, self.details.get("processes_killed", 0))


class _WorkerKillingMessage(ChaosRun):
    """Besides the records, one message whose every delivery ends with its worker process
    dead (``killing_task``, from ``aura.chaos.tasks``): expected in the DLQ as
    worker_lost, the only dead letter."""

    killing_task: ClassVar[str]
    worker_module_name = "aura.chaos.tasks"
    worker_pool = "prefork"  # its tasks are def tasks that kill or outlive their process
    expected_fates = "records committed once; the killing message worker_lost"

    async def before_load(self) -> None:
        killing_id = f"{self.killing_task.rsplit('.', 1)[-1]}-{uuid.uuid4().hex}"
        await asyncio.to_thread(
            self.publisher.send_task,
            self.killing_task,
            args=[str(self.tenant_id)],
            task_id=killing_id,
            queue=REALTIME_QUEUE,
        )
        self.sent.append(Sent(killing_id))

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        return _expect_letters(accounting, len(self.records), {"worker_lost": 1})


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

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        failures = super().expect(accounting, metrics)
        if metrics["soft_timeouts"] == 0:
            failures.append("no task reached the soft time limit")
        if metrics["hard_timeouts"] == 0:
            failures.append("no process was killed at the hard time limit")
        return failures


# 7 ----------------------------------------------------------------------------------
class Killer(_WorkerKillingMessage):
    name = "killer"
    summary = "a message that kills its worker every time → DLQ after bounded deliveries"
    default_products = 100
    killing_task = "aura.chaos.crash"  # SIGKILLs its own process


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
        await asyncio.to_thread(self.stack.redis.stop)
        self.details["redis_down_s"] = self.down_s
        await asyncio.sleep(self.down_s)

    async def heal(self) -> None:
        if not self.stack.redis.answers():
            await asyncio.to_thread(self.stack.redis.start)

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        failures = _all_committed(accounting, self.records)
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
        failures = _all_committed(accounting, self.records)
        if self.details.get("connections_closed", 0) < self.closes:
            failures.append(
                f"the connections were closed {self.details.get('connections_closed')} times"
            )
        return failures


# 11 ---------------------------------------------------------------------------------
def malformed_messages(
    marker: str,
) -> list[tuple[str, bytes, str | None, str | None, dict[str, Any] | None]]:
    """(kind, body, content type, encoding, headers): one of every kind the envelope guard
    refuses (``aura.messaging.envelope``); each body carries ``marker``."""

    def headers(task: str = INGEST_TASK, **extra: Any) -> dict[str, Any]:
        return {"task": task, "id": str(uuid.uuid4()), "lang": "py", **extra}

    ok = json.dumps([[marker, str(uuid.uuid4())], {}, {}]).encode()
    js, utf8 = "application/json", "utf-8"
    deep = ("[" * 1000 + f'"{marker}"' + "]" * 1000).encode()
    pickled = b"\x80\x04K\x01." + marker.encode()
    no_headers = json.dumps({"task": INGEST_TASK, "args": [marker]}).encode()
    too_many = json.dumps([[marker, 1, 2, 3, 4, 5], {}, {}]).encode()
    gzip = headers(compression="application/x-gzip")
    return [
        ("not_json", f"not json {marker} {{".encode(), js, utf8, headers()),
        ("not_json", b'["\xff\xfe' + marker.encode() + b'"]', js, utf8, headers()),
        ("bad_shape", json.dumps({"run": marker}).encode(), js, utf8, headers()),
        ("bad_shape", json.dumps([[marker], {}]).encode(), js, utf8, headers()),
        ("content_type", ok, "text/plain", utf8, headers()),
        ("content_type", pickled, "application/x-python-serialize", "binary", headers()),
        ("not_protocol_2", ok, js, utf8, {"id": str(uuid.uuid4())}),
        ("not_protocol_2", no_headers, js, utf8, None),
        ("unknown_task", ok, js, utf8, headers(task="aura.no_such_task")),
        ("bad_arguments", too_many, js, utf8, headers()),
        ("bad_headers", ok, js, utf8, headers(timelimit="soon")),
        ("bad_headers", ok, js, utf8, headers(eta="the day after tomorrow")),
        ("too_deep", b"[" + deep + b", {}, {}]", js, utf8, headers()),
        ("bad_message_id", ok, js, utf8, {**headers(), "id": "../../etc/passwd"}),
        ("not_json", b"not zlib " + marker.encode(), js, utf8, gzip),
    ]


class MalformedMessages(ChaosRun):
    name = "malformed"
    summary = "malformed messages published raw to the work queues (every envelope kind)"
    expected_fates = "records committed once; each raw message malformed_message, byte for byte"

    async def fault(self) -> None:  # raw, while the worker consumes the records
        await asyncio.to_thread(self._publish_raw)

    def _publish_raw(self) -> None:
        kinds = malformed_messages("")  # the kinds, for the count
        with Connection(self.stack.broker_url, transport_options={"confirm_publish": True}) as conn:
            producer = conn.Producer()
            for index in range(len(kinds)):
                marker = f"chaos-malformed-{uuid.uuid4().hex}"
                _, body, content_type, encoding, headers = malformed_messages(marker)[index]
                producer.publish(
                    body,
                    exchange=WORK_EXCHANGE.name,
                    routing_key=self.rng.choice([BULK_QUEUE, REALTIME_QUEUE]),
                    content_type=content_type,
                    content_encoding=encoding,
                    headers=headers or {},
                    delivery_mode="persistent",
                )
                self.sent.append(Sent("", marker=marker.encode()))
        self.details["malformed_kinds"] = sorted({kind for kind, *_ in kinds})

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        return _expect_letters(
            accounting, len(self.records), {"malformed_message": len(self.sent)}
        ) + _extra_calls(accounting)


# 12 ---------------------------------------------------------------------------------
class ReusedMessageId(ChaosRun):
    name = "reused-id"
    summary = "a committed message id sent again with another payload (ingest and enrich)"
    expected_fates = "records committed once; each reuse one conflicting_message_id letter"

    async def on_tick(self, counts: Any) -> None:
        if self.sent or counts.enriched < 2:
            return
        from sqlalchemy import select

        from aura.catalog import Enrichment, ImportRecord
        from aura.db import Database

        database = Database.from_settings(self.settings)
        try:
            async with database.session() as session:
                record_id, product_id = (
                    await session.execute(
                        select(ImportRecord.message_id, ImportRecord.product_id)
                        .join(Enrichment, Enrichment.product_id == ImportRecord.product_id)
                        .limit(1)
                    )
                ).one()
                other = await session.scalar(
                    select(Enrichment.product_id).where(Enrichment.product_id != product_id)
                )
        finally:
            await database.dispose()
        other_record = valid_records(len(self.records) + 1)[-1]
        reuses = [
            (INGEST_TASK, [other_record, str(self.tenant_id)], record_id, BULK_QUEUE),
            (
                ENRICH_TASK,
                [str(other), str(self.tenant_id)],
                f"enrich-{product_id}",
                REALTIME_QUEUE,
            ),
        ]
        for task, args, message_id, queue in reuses:
            await asyncio.to_thread(
                self.publisher.send_task, task, args=args, task_id=message_id, queue=queue
            )
            self.sent.append(Sent(message_id, conflict=True))

    def awaiting_more(self, letters: list[Any]) -> bool:
        return not self.sent or super().awaiting_more(letters)

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        failures = []
        if accounting.committed_once != 2 * len(self.records):
            failures.append(f"committed {accounting.committed_once} of {2 * len(self.records)}")
        if accounting.dead_lettered != {"conflicting_message_id": len(self.sent)}:
            failures.append(
                f"expected {len(self.sent)} conflicting_message_id letters, "
                f"got {accounting.dead_lettered}"
            )
        return failures + _extra_calls(accounting)


# 13 ---------------------------------------------------------------------------------
class LargeRecord(ChaosRun):
    """A 10 MB record, twice: in an import through the gateway (refused at the edge,
    whole: nothing of that import is written), and as an ingest message published
    straight to the work queue, past the gateway (the worker's fate: poison_pill)."""

    name = "large-record"
    summary = "a 10 MB record: refused by the gateway; published raw, poison_pill"
    expected_fates = (
        "records committed once; the gateway refuses the 10 MB import (4xx, nothing "
        "written); the raw 10 MB message poison_pill"
    )
    record_bytes = 10 * 1024 * 1024

    def _huge(self) -> str:
        padding = "x" * self.record_bytes
        return json.dumps(
            {"title": "Huge", "brand": padding, "variants": [{"sku": "HUGE-1", "price": "1"}]}
        )

    async def fault(self) -> None:
        huge = self._huge()
        response = await self._client.post(
            f"/v1/tenants/{self.tenant_id}/imports",
            content="\n".join([valid_records(1)[0], huge]).encode(),
            headers={"X-API-Key": self._key, "content-type": "application/x-ndjson"},
        )
        self.details["gateway_status"] = response.status_code
        message_id = f"large-record-{uuid.uuid4()}"
        await asyncio.to_thread(
            self.publisher.send_task,
            INGEST_TASK,
            args=[huge, str(self.tenant_id)],
            task_id=message_id,
            queue=BULK_QUEUE,
        )
        self.sent.append(Sent(message_id))

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        failures = _expect_letters(accounting, len(self.records), {"poison_pill": 1})
        status = self.details.get("gateway_status")
        if not (isinstance(status, int) and 400 <= status < 500):
            failures.append(f"the gateway answered the 10 MB import with {status}, not a 4xx")
        return failures


# 14 ---------------------------------------------------------------------------------
class Load(ChaosRun):
    name = "load"
    summary = "10,000 records through the gateway: rate, latency, worker CPU per record"
    expected_fates = "all committed once; no extra LLM call"
    default_products = 10_000

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        elapsed = float(self.details.get("elapsed_s") or 1.0)
        self.details["messages_per_s"] = round(accounting.committed_once / elapsed, 1)
        return _all_committed(accounting, self.records) + _extra_calls(accounting)


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
    )
}


def run_scenario(
    name: str | type[ChaosRun],
    *,
    products: int | None = None,
    seed: int | None = None,
    llm_latency: float | None = None,
    concurrency: int | None = None,
) -> ChaosResult:
    """Run one scenario on its own stack, made on the servers DATABASE_URL and
    CELERY_BROKER_URL name (a private redis-server stands for Redis). ``llm_latency``
    replaces the scenario's simulated LLM latency; ``concurrency`` its worker's tasks in
    flight (async pool) or processes (prefork)."""
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
    import dataclasses
    import random

    faults = scenario.faults
    if llm_latency is not None:
        faults = dataclasses.replace(faults, latency=llm_latency)

    records = scenario.make_records(count, random.Random(seed))
    log_path = Path(".aura", f"chaos-{scenario.name}.log").resolve()
    log_path.parent.mkdir(exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix=f"aura-chaos-{scenario.name}-") as scratch,
        _logs_to(log_path),
        LLMSimulator(faults, seed=seed).running_in_thread() as simulator,
    ):
        return asyncio.run(
            _run(scenario, records, simulator, Path(scratch), log_path, seed, settings, concurrency)
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
) -> ChaosResult:
    (scratch / "redis").mkdir()
    async with owned_stack(
        str(settings.database_url),
        str(settings.celery_broker_url),
        scratch / "redis",
        own_broker=scenario.own_broker,
    ) as stack:
        environment = {
            **BASE_ENVIRONMENT,
            **scenario.environment,
            "LLM_BASE_URL": simulator.base_url,
            "DATABASE_URL": stack.database_url,
            "CELERY_BROKER_URL": stack.broker_url,
            "REDIS_URL": stack.redis_url,
        }
        with _environment(environment):
            run = scenario(
                records, simulator, scratch, log_path, stack, seed, concurrency=concurrency
            )
            accounting, metrics = await run.run_and_count()
            failures = [f"drain: {run.details['drain']}"] if "drain" in run.details else []
            failures += accounting.failures() + run.expect(accounting, metrics)
    run.details["database"], run.details["vhost"] = stack.database, stack.vhost
    return ChaosResult(
        scenario=scenario.name,
        passed=not failures,
        seed=seed,
        sent=len(records),
        accounting=accounting.as_dict(),
        metrics=metrics,
        failures=failures,
        details=run.details,
    )
