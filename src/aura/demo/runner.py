"""Running the demo: embedded (one process, no servers) or on the real services.

Embedded (no DATABASE_URL / REDIS_URL / CELERY_BROKER_URL): SQLite in a temporary
folder, Celery's in-memory broker with a worker thread in this process, the in-process
Redis stand-in, the LLM simulator on loopback. Real services (all three set): the same
job with real async-pool worker processes (one per core, two at most).

Either way the demo shortens the LLM timeouts and the breaker's reset timeout (through
the environment the worker reads, as a deployment would) so a run takes about a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import tempfile
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import REGISTRY, CollectorRegistry

from aura.catalog import upgrade
from aura.config import get_settings
from aura.contract import ENRICH_TASK, INGEST_TASK
from aura.db import Database
from aura.demo.report import DemoReport, Tally, tally
from aura.errors import ConfigurationError, InvalidInputError
from aura.llm import Faults, LLMSimulator

__all__ = ["FAULT_PROFILES", "DemoOptions", "ImportRun", "Profile", "demo_environment", "run_demo"]


@dataclass(frozen=True)
class Profile:
    faults: Faults
    outage_s: float  # one outage, longer than the demo's breaker reset timeout


FAULT_PROFILES: dict[str, Callable[[], Profile]] = {
    "off": lambda: Profile(Faults(), 0.0),
    "default": lambda: Profile(
        Faults(
            latency=0.005,
            jitter=0.01,
            error_rate=0.05,
            error_statuses=(500, 503, 429),
            retry_after=1.0,
            hang_rate=0.01,
            hang_seconds=3.0,
        ),
        4.0,
    ),
    "heavy": lambda: Profile(
        Faults(
            latency=0.005,
            jitter=0.02,
            error_rate=0.15,
            error_statuses=(500, 502, 503, 429),
            retry_after=1.0,
            hang_rate=0.03,
            hang_seconds=3.0,
            reset_rate=0.03,
            malformed_rate=0.02,
        ),
        6.0,
    ),
}
# Scaled for a one-minute run; the seed's values stay the defaults everywhere else.
DEMO_ENVIRONMENT = {
    "LLM_READ_TIMEOUT": "1",
    "LLM_CALL_DEADLINE": "2.5",
    "CIRCUIT_BREAKER_RESET_TIMEOUT": "3",
    "CELERY_TASK_SOFT_TIME_LIMIT": "20",
    "CELERY_TASK_HARD_TIME_LIMIT": "30",
    "OUTBOX_RELAY_INTERVAL": "1",
    "OUTBOX_RELAY_MIN_AGE": "3",
}
MAX_PRODUCTS = 20_000


def demo_environment(llm_latency: float) -> dict[str, str]:
    """DEMO_ENVIRONMENT, with the LLM timeouts above the simulated latency: a read
    timeout of 1 s cut every answer of ``--llm-latency 1`` (each call timed out, the
    breaker opened, records were dead-lettered with their deferrals spent)."""
    environment = dict(DEMO_ENVIRONMENT)
    read = max(float(DEMO_ENVIRONMENT["LLM_READ_TIMEOUT"]), 2 * llm_latency + 0.5)
    deadline = max(float(DEMO_ENVIRONMENT["LLM_CALL_DEADLINE"]), 2 * read + 0.5)
    environment["LLM_READ_TIMEOUT"] = f"{read:g}"
    environment["LLM_CALL_DEADLINE"] = f"{deadline:g}"
    return environment


_SETTLE_LIMIT_S = 600.0


@dataclass(frozen=True)
class DemoOptions:
    products: int = 1200
    faults: str = "default"
    progress: Callable[[Tally, int], None] | None = None  # (counts, enrich dead letters)
    concurrency: int = 50  # tasks in flight in the real services' async worker
    llm_latency: float | None = None  # seconds per LLM answer (real calls take 0.3-5 s)

    def __post_init__(self) -> None:
        if not 1 <= self.products <= MAX_PRODUCTS:
            raise InvalidInputError(
                f"--products must be between 1 and {MAX_PRODUCTS}, got {self.products}",
                field="products",
            )
        if not 1 <= self.concurrency <= 2000:
            raise InvalidInputError(
                f"--concurrency must be between 1 and 2000, got {self.concurrency}",
                field="concurrency",
            )
        if self.llm_latency is not None and not 0 <= self.llm_latency <= 60:
            raise InvalidInputError(
                f"--llm-latency must be between 0 and 60 seconds, got {self.llm_latency}",
                field="llm_latency",
            )
        if self.faults not in FAULT_PROFILES:
            raise InvalidInputError(
                f"--faults must be one of {', '.join(FAULT_PROFILES)}, got {self.faults!r}",
                field="faults",
            )


def catalog_records(count: int) -> list[str]:
    """``count`` raw records from the bundled sample catalog (about 3 % malformed);
    past its end, the catalog repeats with new SKUs."""
    text = resources.files("aura.demo").joinpath("sample_catalog.jsonl").read_text()
    base = [line for line in text.splitlines() if line.strip()]
    records = []
    for index in range(count):
        line = base[index % len(base)]
        cycle = index // len(base)
        records.append(line if cycle == 0 else line.replace('"SMP-', f'"SMP{cycle}-'))
    return records


@contextlib.contextmanager
def _logs_to(path: Path) -> Iterator[None]:
    """Send this process's logs to ``path`` for the run: the progress bar and the report
    stay readable, and every retry, deferral and dead letter is still written down."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)]
    path.write_text("", encoding="utf-8")  # a new run's log; appended to from here on,
    with path.open("a", encoding="utf-8") as stream:  # as the workers' lines are (else
        # this stream's own offset wrote over theirs: a chaos log kept none of them)
        saved = [handler.setStream(stream) for handler in handlers]
        try:
            yield
        finally:
            for handler, original in zip(handlers, saved, strict=True):
                handler.setStream(original)


@contextlib.asynccontextmanager
async def _cancelled_at_exit(task: asyncio.Task[None]) -> AsyncIterator[None]:
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    get_settings.cache_clear()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        get_settings.cache_clear()


def _metric_total(registry: CollectorRegistry, name: str, **labels: str) -> int:
    total = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return int(total)


def run_demo(options: DemoOptions) -> DemoReport:
    settings = get_settings()
    real = [settings.database_url, settings.redis_url, settings.celery_broker_url]
    if any(real) and not all(real):
        raise ConfigurationError(
            "set all of DATABASE_URL, REDIS_URL and CELERY_BROKER_URL for the real services, "
            "or none of them for the embedded demo"
        )
    profile = FAULT_PROFILES[options.faults]()
    if settings.llm_base_url is not None:  # a real provider: nothing to inject
        profile = FAULT_PROFILES["off"]()
    if options.llm_latency is not None:
        profile.faults.latency = options.llm_latency
    log_path = Path(".aura", "demo.log").resolve()
    log_path.parent.mkdir(exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="aura-demo-") as scratch,
        _logs_to(log_path),
        LLMSimulator(profile.faults, seed=7).running_in_thread() as simulator,
    ):
        environment = demo_environment(profile.faults.latency)
        if settings.llm_base_url is None:
            environment["LLM_BASE_URL"] = simulator.base_url
        if not all(real):
            environment["DATABASE_URL"] = f"sqlite+aiosqlite:///{scratch}/demo.db"
        with _environment(environment):
            runner = _DemoRun(
                catalog_records(options.products),
                options.faults,
                simulator,
                Path(scratch),
                log_path,
                embedded=not all(real),
                progress=options.progress,
                outage_s=profile.outage_s,
                worker_concurrency=options.concurrency,
            )
            report = asyncio.run(runner.run())
            report.concurrency = options.concurrency if all(real) else 1
            report.llm_latency_s = profile.faults.latency
            return report


class ImportRun:
    """One import through the gateway, the worker and the simulator, to its accounting.

    ``records`` go to the gateway as one import; the run waits until every record is
    written or dead-lettered and every product enriched or dead-lettered (or
    ``settle_limit`` passes), then counts. Subclasses inject faults: ``on_started`` once
    the import is accepted, ``on_tick`` at each look at the counts (every 0.5 s).
    """

    def __init__(
        self,
        records: list[str],
        label: str,
        simulator: LLMSimulator,
        scratch: Path,
        log_path: Path,
        *,
        embedded: bool,
        progress: Callable[[Tally, int], None] | None = None,
        settle_limit: float = _SETTLE_LIMIT_S,
        worker_module: str = "aura.worker.tasks",
        worker_concurrency: int = 2,
    ) -> None:
        self.records = records
        self.label = label
        self.simulator = simulator
        self.scratch = scratch
        self.log_path = log_path
        self.embedded = embedded
        self.progress = progress
        self.settle_limit = settle_limit
        self.worker_module = worker_module
        self.worker_concurrency = worker_concurrency
        self.settings = get_settings()
        self.metrics_dir = scratch / "metrics"
        self.worker_processes: list[subprocess.Popen[bytes]] = []
        self._worker_cpu_start: float | None = None
        self.publisher: Any = None
        self.tenant_id: uuid.UUID | None = None
        self.letters: list[Any] = []  # this run's dead letters, once settled
        self.import_ids: list[uuid.UUID] = []

    async def on_started(self) -> None:
        """Called once the gateway accepted the import (faults start here)."""

    async def on_tick(self, counts: Tally) -> None:
        """Called at every look at the counts."""

    async def on_settled(self) -> None:
        """Called when the run is settled, before the report (faults stop here)."""

    def awaiting_more(self, letters: list[Any]) -> bool:
        """True while something beyond the import is still expected (a dead letter)."""
        return False

    async def run(self) -> DemoReport:
        database = Database.from_settings(self.settings)
        await upgrade(database)
        with self._worker() as publisher:
            try:
                return await self._import(database, publisher)
            finally:
                await database.dispose()

    @contextlib.contextmanager
    def _worker(self) -> Iterator[Any]:
        from aura.worker.celery_app import make_celery_app
        from aura.worker.process import start_worker_process, stop_worker_process

        if self.embedded:
            from celery.platforms import SecurityWarning

            from aura.worker.tasks import app

            # A worker thread inside this CLI process: Celery's advice against running a
            # worker as root is about a deployed worker, not a one-minute demo.
            warnings.filterwarnings("ignore", category=SecurityWarning)

            worker = app.Worker(
                pool="solo",
                queues=["realtime_queue", "bulk_queue"],
                loglevel="WARNING",
                redirect_stdouts=False,
                quiet=True,
                without_heartbeat=True,
                without_gossip=True,
                without_mingle=True,
            )
            thread = threading.Thread(target=worker.start, name="demo-worker", daemon=True)
            thread.start()
            try:
                yield app
            finally:
                with contextlib.suppress(Exception):
                    worker.stop(in_sighandler=False)
                thread.join(timeout=10)
            return
        self.metrics_dir.mkdir()
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        env.setdefault("WORKER_METRICS_PORT", "0")  # the demo reads the files, not a port
        log = self.log_path.open("ab")  # closed below
        # The async pool: many LLM calls in flight, in one process per core (two at most:
        # a demo), as `aura worker --processes` runs them; the concurrency is split.
        count = max(1, min(os.cpu_count() or 1, 2, self.worker_concurrency))
        share = -(-self.worker_concurrency // count)
        self.worker_processes = [
            start_worker_process(
                self.worker_module,
                env,
                log,
                concurrency=share,
                pool="async",
                hostname=f"demo{i}@%h",
            )
            for i in range(count)
        ]
        try:
            yield make_celery_app(self.settings)
        finally:
            for process in self.worker_processes:
                stop_worker_process(process)
            log.close()

    async def _import(self, database: Database, publisher: Any) -> DemoReport:
        from aura.gateway import Gateway, create_app, create_tenant_with_key
        from aura.gateway.outbox import relay_forever

        self.publisher = publisher
        async with database.session() as session:
            tenant, key = await create_tenant_with_key(
                session, f"{self.label}-{uuid.uuid4().hex[:8]}"
            )
            await session.commit()
        self.tenant_id = tenant.id
        app = create_app(Gateway(database, publisher, {}))
        started = time.monotonic()
        self._worker_cpu_start = self._worker_cpu()
        # The gateway's outbox relay, as `aura gateway` runs it: what a failed publish
        # (a broker fault) left in the outbox is sent later.
        relay = asyncio.create_task(
            relay_forever(
                database,
                publisher,
                interval=self.settings.outbox_relay_interval,
                min_age=self.settings.outbox_relay_min_age,
            )
        )
        async with (
            _cancelled_at_exit(relay),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://aura-gateway"
            ) as client,
        ):
            self._client, self._key = client, key
            await self.post_import(self.first_records())
            await self.on_started()
            try:
                counts, letters = await self._settle(database, tenant.id)
            finally:
                await self.on_settled()
            async with database.session() as session:
                counts = await tally(session, tenant.id, self.import_ids, latencies=True)
        self.letters = letters
        elapsed = time.monotonic() - started
        report = self._report(tenant.id, counts, letters, elapsed)
        cpu_end = self._worker_cpu()
        if cpu_end is not None and self._worker_cpu_start is not None and counts.enriched:
            spent = cpu_end - self._worker_cpu_start
            report.worker_cpu_ms_per_record = round(1000 * spent / counts.enriched, 2)
        return report

    def _worker_cpu(self) -> float | None:
        """Seconds of CPU the worker processes (and their children) used so far; None
        without /proc to read them from."""
        from aura.worker.process import process_tree_cpu_s

        if not self.worker_processes or not Path("/proc/self/stat").exists():
            return None
        return sum(process_tree_cpu_s(process.pid) for process in self.worker_processes)

    def first_records(self) -> list[str]:
        """What the run imports at its start (all of ``records`` unless a subclass posts
        the rest later with ``post_import``)."""
        return self.records

    async def post_import(self, records: list[str]) -> uuid.UUID:
        """Send ``records`` to the gateway as one import; the run waits for it too."""
        response = await self._client.post(
            f"/v1/tenants/{self.tenant_id}/imports",
            content="\n".join(records).encode(),
            headers={"X-API-Key": self._key, "content-type": "application/x-ndjson"},
        )
        if response.status_code != 202:
            raise RuntimeError(f"the gateway refused the import: {response.text[:300]}")
        import_id = uuid.UUID(response.json()["import_id"])
        self.import_ids.append(import_id)
        return import_id

    async def _settle(self, database: Database, tenant_id: uuid.UUID) -> tuple[Tally, list[Any]]:
        deadline = time.monotonic() + self.settle_limit
        letters: list[Any] = []
        letters_read = float("-inf")
        while True:
            try:
                async with database.session() as session:
                    counts = await tally(session, tenant_id, self.import_ids)
                # The DLQ is read whole (filtered by tenant): every few seconds for the
                # progress bar, and at every look once nothing is pending.
                if counts.pending == 0 or time.monotonic() - letters_read >= 3.0:
                    letters = await asyncio.to_thread(self._dead_letters, tenant_id)
                    letters_read = time.monotonic()
            except Exception:  # a fault this run injected (a killed connection): look again
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
                continue
            enrich_dead = sum(1 for letter in letters if letter.task == ENRICH_TASK)
            if self.progress is not None:
                self.progress(counts, enrich_dead)
            imports = len(self.import_ids)
            await self.on_tick(counts)
            settled = counts.pending == 0 and counts.enriched + enrich_dead >= counts.done
            # Counted before on_tick: an import it posted is not in them yet.
            settled = settled and imports == len(self.import_ids)
            settled = settled and not self.awaiting_more(letters)
            if settled or time.monotonic() > deadline:
                return counts, letters
            await asyncio.sleep(0.5)

    def _dead_letters(self, tenant_id: uuid.UUID) -> list[Any]:
        """This run's dead letters (a real DLQ may hold other tenants' and older runs')."""
        from aura.messaging import DeadLetterQueue
        from aura.worker.tasks import app

        with app.connection_for_write() as connection:
            return DeadLetterQueue(connection).list(tenant=str(tenant_id), limit=100_000)

    def _registry(self) -> CollectorRegistry:
        if self.embedded:
            return REGISTRY
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.metrics_dir))  # type: ignore[no-untyped-call]
        return registry

    def _report(
        self, tenant_id: uuid.UUID, counts: Tally, letters: list[Any], elapsed: float
    ) -> DemoReport:
        registry = self._registry()
        by_reason = Counter(letter.reason.value for letter in letters)
        first_of_each: dict[str, Any] = {}
        for letter in letters:  # one example per (reason, task), for the report
            first_of_each.setdefault(f"{letter.reason.value}/{letter.task}", letter)
        samples = [
            {"id": x.id, "reason": x.reason.value, "task": x.task, "error": x.error[:100]}
            for x in first_of_each.values()
        ]
        return DemoReport.build(
            mode="embedded" if self.embedded else "real services",
            faults=self.label,
            counts=counts,
            dead_lettered=dict(by_reason),
            ingest_dead=sum(1 for x in letters if x.task == INGEST_TASK),
            enrich_dead=sum(1 for x in letters if x.task == ENRICH_TASK),
            retries=_metric_total(registry, "aura_task_retries_total", kind="retry"),
            deferrals=_metric_total(registry, "aura_task_retries_total", kind="deferral"),
            breaker_opens=_metric_total(registry, "llm_circuit_breaker_opens_total"),
            llm_requests=self.simulator.requests,
            llm_failed=sum(n for k, n in self.simulator.outcomes().items() if k != "ok"),
            elapsed_s=elapsed,
            tenant_id=str(tenant_id),
            log_path=str(self.log_path),
            samples=samples,
        )


def report_json(report: DemoReport) -> str:
    return json.dumps(report.as_dict(), indent=2)


class _DemoRun(ImportRun):
    """The demo: one LLM outage, started once 30 % of the records are written."""

    def __init__(self, *args: Any, outage_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outage_s = outage_s
        self.outage_started = outage_s == 0

    async def on_tick(self, counts: Tally) -> None:
        if not self.outage_started and counts.done >= counts.accepted * 0.3:
            self.simulator.start_outage(self.outage_s)
            self.outage_started = True
