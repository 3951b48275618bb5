"""One import through the gateway, the worker and the simulator, to its accounting: the
run the demo makes, and every chaos scenario (``aura.chaos.run``) builds on."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import REGISTRY, CollectorRegistry

from aura.catalog import upgrade
from aura.config import get_settings
from aura.contract import ENRICH_TASK, INGEST_TASK
from aura.db import Database
from aura.demo.harness import cancelled_at_exit, metric_total
from aura.demo.report import DemoReport, Tally, tally
from aura.llm import LLMSimulator
from aura.timeline import Recorder, Source, metric_source, probe_source

_MEMORY_POLL_S = 0.005  # the embedded broker's wait when it has nothing to give

__all__ = ["ImportRun", "start_relay"]

_SETTLE_LIMIT_S = 600.0
_LOOK_S = 0.5  # between looks at the counts
_LETTERS_EVERY_S = 3.0  # between reads of the DLQ while records are pending


def start_relay(database: Database, publisher: Any, settings: Any) -> asyncio.Task[None]:
    """The gateway's outbox relay, as `aura gateway` runs it: what a failed publish (a
    broker fault) left in the outbox is sent later."""
    from aura.gateway.outbox import relay_forever

    return asyncio.create_task(
        relay_forever(
            database,
            publisher,
            interval=settings.outbox_relay_interval,
            min_age=settings.outbox_relay_min_age,
        )
    )


@contextlib.asynccontextmanager
async def _dispatching(gateway: Any) -> AsyncIterator[None]:
    """The gateway's fair dispatcher stops with the run."""
    try:
        yield
    finally:
        await gateway.dispatcher.aclose()


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
        self.recorder = Recorder()  # its windows, and its samples with a report asked

    async def on_started(self) -> None:
        """Called once the gateway accepted the import (faults start here)."""

    async def on_tick(self, counts: Tally) -> None:
        """Called at every look at the counts."""

    async def on_settled(self) -> None:
        """Called when the run is settled, before the report (faults stop here)."""

    def timeline_sources(self) -> list[Source]:
        """What the report's sampler reads (``aura.timeline.sampler``): the metrics, and on
        the real services the broker's queues."""
        url = self.settings.celery_broker_url
        if self.embedded or self.publisher is None or not url:
            return [metric_source(self._registry)]
        return [metric_source(self._registry), probe_source(url, self.publisher)]

    def awaiting_more(self, letters: list[Any]) -> bool:
        """True while something beyond the import is still expected (a dead letter)."""
        return False

    def settled(self, counts: Tally, enrich_dead: int, imports: int, letters: list[Any]) -> bool:
        """Every record and every enrichment has its fate, no import was posted since
        ``counts`` were read (``imports``: how many there were then), and nothing more is
        awaited."""
        return (
            counts.pending == 0
            and counts.enriched + enrich_dead >= counts.done
            and imports == len(self.import_ids)
            and not self.awaiting_more(letters)
        )

    async def run(self) -> DemoReport:
        database = Database.from_settings(self.settings)
        await upgrade(database)
        with self._worker() as publisher:
            try:
                return await self._import(database, publisher)
            finally:
                await database.dispose()

    # -- the worker ------------------------------------------------------------------

    @contextlib.contextmanager
    def _worker(self) -> Iterator[Any]:
        """The worker for the run, and the Celery app to publish with."""
        with self._embedded_worker() if self.embedded else self._worker_processes() as app:
            yield app

    @contextlib.contextmanager
    def _embedded_worker(self) -> Iterator[Any]:
        """A worker thread inside this process, on the in-memory broker."""
        from celery.platforms import SecurityWarning

        from aura.worker.tasks import app

        # A worker thread inside this CLI process: Celery's advice against running a
        # worker as root is about a deployed worker, not a one-minute demo.
        warnings.filterwarnings("ignore", category=SecurityWarning)

        from aura.messaging.app import ASYNC_POOL

        # kombu's in-memory transport sleeps polling_interval (1 s) whenever it finds
        # nothing it may take, a full prefetch window included: the worker idled.
        app.conf.broker_transport_options = {
            **(app.conf.broker_transport_options or {}),
            "polling_interval": _MEMORY_POLL_S,
        }
        worker = app.Worker(
            pool=ASYNC_POOL,
            concurrency=self.worker_concurrency,
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

    @contextlib.contextmanager
    def _worker_processes(self) -> Iterator[Any]:
        """Async-pool worker processes on the real services."""
        from aura.worker.celery_app import make_celery_app
        from aura.worker.process import start_worker_process, stop_worker_process

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

    def _worker_cpu(self) -> float | None:
        """Seconds of CPU the worker processes (and their children) used so far; None
        without /proc to read them from."""
        from aura.worker.process import process_tree_cpu_s

        if not self.worker_processes or not Path("/proc/self/stat").exists():
            return None
        return sum(process_tree_cpu_s(process.pid) for process in self.worker_processes)

    # -- the gateway -----------------------------------------------------------------

    async def open_tenant(self, database: Database) -> str:
        """A tenant of the run's own (``tenant_id``); its API key."""
        from aura.gateway import create_tenant_with_key

        async with database.session() as session:
            tenant, key = await create_tenant_with_key(
                session, f"{self.label}-{uuid.uuid4().hex[:8]}"
            )
            await session.commit()
        self.tenant_id = tenant.id
        return key

    @contextlib.asynccontextmanager
    async def gateway_client(self, app: Any, key: str) -> AsyncIterator[httpx.AsyncClient]:
        """A client of the gateway ``app`` in this process, that ``post_import`` uses."""
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://aura-gateway"
        ) as client:
            self._client, self._key = client, key
            yield client

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

    # -- the run ---------------------------------------------------------------------

    async def _import(self, database: Database, publisher: Any) -> DemoReport:
        from aura.gateway import Gateway, create_app

        self.publisher = publisher
        key = await self.open_tenant(database)
        assert self.tenant_id is not None
        tenant_id = self.tenant_id
        gateway = Gateway(database, publisher, {}, scheduling=self.settings.tenant_scheduling)
        app = create_app(gateway)
        started = time.monotonic()
        self.recorder.begin(self.timeline_sources)
        self._worker_cpu_start = self._worker_cpu()
        relay = start_relay(database, publisher, self.settings)
        gateway.dispatcher.start()  # as `aura gateway` runs it: through every fault
        async with (
            cancelled_at_exit(relay),
            _dispatching(gateway),
            self.gateway_client(app, key),
        ):
            await self.post_import(self.first_records())
            await self.on_started()
            try:
                counts, letters = await self._settle(database, tenant_id)
            finally:
                self.recorder.finish()
                await self.on_settled()
            async with database.session() as session:
                counts = await tally(session, tenant_id, self.import_ids, latencies=True)
                await self.recorder.read_records(session, tenant_id, self.import_ids)
        self.letters = letters
        elapsed = time.monotonic() - started
        report = self._report(tenant_id, counts, letters, elapsed)
        cpu_end = self._worker_cpu()
        if cpu_end is not None and self._worker_cpu_start is not None and counts.enriched:
            spent = cpu_end - self._worker_cpu_start
            report.worker_cpu_ms_per_record = round(1000 * spent / counts.enriched, 2)
        return report

    async def _look(
        self, database: Database, tenant_id: uuid.UUID, letters: list[Any], letters_read: float
    ) -> tuple[Tally, list[Any], float]:
        """The counts, and the DLQ read whole (filtered by tenant): every few seconds for
        the progress bar, and at every look once nothing is pending."""
        async with database.session() as session:
            counts = await tally(session, tenant_id, self.import_ids)
        if counts.pending == 0 or time.monotonic() - letters_read >= _LETTERS_EVERY_S:
            letters = await asyncio.to_thread(self._dead_letters, tenant_id)
            letters_read = time.monotonic()
        return counts, letters, letters_read

    async def _settle(self, database: Database, tenant_id: uuid.UUID) -> tuple[Tally, list[Any]]:
        deadline = time.monotonic() + self.settle_limit
        letters: list[Any] = []
        letters_read = float("-inf")
        while True:
            try:
                counts, letters, letters_read = await self._look(
                    database, tenant_id, letters, letters_read
                )
            except Exception:  # a fault this run injected (a killed connection): look again
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(_LOOK_S)
                continue
            enrich_dead = sum(1 for letter in letters if letter.task == ENRICH_TASK)
            if self.progress is not None:
                self.progress(counts, enrich_dead)
            imports = len(self.import_ids)
            await self.on_tick(counts)
            # Counted before on_tick: an import it posted is not in them yet.
            settled = self.settled(counts, enrich_dead, imports, letters)
            if settled or time.monotonic() > deadline:
                return counts, letters
            await asyncio.sleep(_LOOK_S)

    def _dead_letters(self, tenant_id: uuid.UUID) -> list[Any]:
        """This run's dead letters (a real DLQ may hold other tenants' and older runs')."""
        from aura.messaging import DeadLetterQueue
        from aura.worker.tasks import app

        with app.connection_for_write() as connection:
            return DeadLetterQueue(connection).list(tenant=str(tenant_id), limit=100_000)

    # -- the report ------------------------------------------------------------------

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
            retries=metric_total(registry, "aura_task_retries_total", kind="retry"),
            deferrals=metric_total(registry, "aura_task_retries_total", kind="deferral"),
            breaker_opens=metric_total(registry, "llm_circuit_breaker_opens_total"),
            llm_requests=self.simulator.requests,
            llm_failed=sum(n for k, n in self.simulator.outcomes().items() if k != "ok"),
            elapsed_s=elapsed,
            tenant_id=str(tenant_id),
            log_path=str(self.log_path),
            samples=samples,
        )
