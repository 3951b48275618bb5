"""One chaos run: load, fault, heal, drain, stop, count.

    1. the run's own stack (``aura.chaos.resources``): database, vhost, Redis server
    2. the tenant; ``before_load`` (a scenario may publish its own messages here)
    3. the worker under a supervisor (``aura.chaos.supervisor``) that restarts it on exit
       (``workers`` of them, each under its own, for a scenario that needs a fleet)
    4. the records go in through the gateway (outbox, relay)
    5. once the worker consumes (a first record reached its fate), the fault window
       (``fault``, bounded by the scenario), then ``heal`` (restart what it stopped)
    6. the drain (``aura.chaos.drain``): until every record and enrichment reached a
       fate, with a bound that follows progress (``stall_s`` with nothing moving fails
       the run, however long it took to get there)
    7. the worker is stopped, then every message is counted (``aura.chaos.accounting``)

Every wait is bounded; nothing outside the run's own stack is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import random
import time
from pathlib import Path
from typing import Any, ClassVar

from kombu.connection import Connection
from prometheus_client import CollectorRegistry

from aura.catalog import upgrade
from aura.chaos.accounting import (
    Accounting,
    Sent,
    account,
    carries,
    queue_depths,
    read_broker,
)
from aura.chaos.drain import Drain
from aura.chaos.expectations import all_committed
from aura.chaos.proxy import FaultProxy, NetworkProxies, proxied_url
from aura.chaos.records import valid_records
from aura.chaos.resources import OwnedStack
from aura.chaos.supervisor import WorkerSupervisor
from aura.db import Database
from aura.demo.harness import metric_total
from aura.demo.import_run import ImportRun, start_relay
from aura.demo.report import Tally, percentile, tally
from aura.llm import Faults, LLMSimulator
from aura.messaging import DeadLetter, DeadLetterQueue
from aura.messaging.topology import DEAD_LETTER_QUEUE
from aura.timeline import Source, metric_source, probe_source

__all__ = ["ChaosRun"]


class ChaosRun(ImportRun):
    """A scenario: the records it sends, its fault window and heal, what it expects."""

    name: ClassVar[str]
    summary: ClassVar[str]
    expected_fates: ClassVar[str] = "all committed once"
    default_products: ClassVar[int] = 200
    faults: ClassVar[Faults] = Faults()
    environment: ClassVar[dict[str, str]] = {}
    worker_module_name: ClassVar[str] = "aura.worker.tasks"
    # The async pool (the default worker mode), 20 tasks in flight; scenarios that need
    # prefork children (to SIGKILL one, or a def task past the hard limit) say prefork.
    worker_pool: ClassVar[str] = "async"
    worker_slots: ClassVar[int] = 20
    # Worker processes on the run's stack, each under its own supervisor; a scenario
    # gives one its own environment with ``worker_environment``.
    workers: ClassVar[int] = 1
    stall_s: ClassVar[float] = 90.0
    # Services the worker reaches through a proxy the run owns (``aura.chaos.proxy``):
    # any of postgres, rabbitmq, redis, llm. The outbox relay (the gateway's publisher)
    # reaches PostgreSQL and RabbitMQ through them too; the gateway's HTTP side and the
    # run's own bookkeeping stay direct (they must see the truth through any fault).
    proxied: ClassVar[tuple[str, ...]] = ()
    # The run's broker is a RabbitMQ node it starts (``PrivateRabbitMQ``), for a fault that
    # is node-wide (a memory alarm); else a vhost on the configured broker.
    # ``"cluster"``: three clustered nodes the run starts (``PrivateRabbitMQCluster``),
    # every component given the ``;``-separated list of their URLs.
    own_broker: ClassVar[bool | str] = False
    # ``"sentinel"``: Redis is a primary, a replica and three sentinels of the run's own,
    # reached by a ``redis+sentinel://`` URL; else one redis-server of its own.
    own_redis: ClassVar[str] = "single"
    # ``"replicated"``: the database is on a PostgreSQL primary + streaming replica the
    # run starts, reached by a multi-host URL; else a database on the configured server.
    own_database: ClassVar[str] = "shared"
    # The gateway publishes as ``aura gateway`` does (``AmqpSender``, on the event loop:
    # it sees a blocked broker), and so does the relay; else Celery's ``send_task``.
    amqp_gateway: ClassVar[bool] = False

    def __init__(
        self,
        records: list[str],
        simulator: LLMSimulator,
        scratch: Path,
        log_path: Path,
        stack: OwnedStack,
        seed: int,
        *,
        concurrency: int | None = None,
    ) -> None:
        super().__init__(
            records,
            f"chaos-{self.name}",
            simulator,
            scratch,
            log_path,
            embedded=False,
            worker_module=self.worker_module_name,
        )
        self.stack = stack
        self.seed = seed
        self.rng = random.Random(seed)
        self.details: dict[str, Any] = {}
        self.sent: list[Sent] = []
        self.supervisor: WorkerSupervisor | None = None  # worker 0's
        self.supervisors: list[WorkerSupervisor] = []
        self.metric_dirs: list[Path] = []
        self._launches = itertools.count()  # supervisors relaunch from their own threads
        self.letters_seen: list[DeadLetter] = []
        default_slots = self.worker_slots if self.worker_pool == "async" else 2
        self.concurrency = concurrency or default_slots
        self.network: NetworkProxies | None = None
        self.proxies: dict[str, FaultProxy] = {}
        self._worker_urls: dict[str, str] = {}

    @classmethod
    def make_records(cls, products: int, rng: random.Random) -> list[str]:
        return valid_records(products)

    # -- hooks ---------------------------------------------------------------------------
    async def before_load(self) -> None:
        """The tenant exists, the worker does not run yet."""

    async def fault(self) -> None:
        """The fault window, beside the load (bounded: the drain waits for it)."""

    async def heal(self) -> None:
        """After the fault window: restart what it stopped."""

    async def before_count(self, database: Database) -> None:
        """The worker is stopped; nothing is counted yet."""

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        """This scenario's expected fates, beyond the invariants (failures, if any)."""
        return all_committed(accounting, self.records)

    def awaiting_more(self, letters: list[Any]) -> bool:
        """True while a message the scenario sent itself has no dead letter yet."""
        return not all(_has_letter(s, letters) for s in self.sent)

    def worker_environment(self, index: int) -> dict[str, str]:
        """What worker ``index`` (0 to ``workers`` - 1) adds to its environment."""
        return {}

    # -- the run -------------------------------------------------------------------------
    @property
    def worker_pid(self) -> int | None:
        return None if self.supervisor is None else self.supervisor.pid

    @property
    def worker_restarts(self) -> int:
        return sum(supervisor.restarts for supervisor in self.supervisors)

    def _launch(self, index: int = 0) -> Any:
        import os

        from aura.worker.process import start_worker_process

        # A directory per launch: a worker clears the metric files it finds at its start.
        directory = self.metrics_dir / f"worker-{index}-launch-{next(self._launches)}"
        directory.mkdir(parents=True)
        self.metric_dirs.append(directory)
        env = {
            **os.environ,
            **self._worker_urls,
            **self.worker_environment(index),
            "PROMETHEUS_MULTIPROC_DIR": str(directory),
        }
        with self.log_path.open("ab") as log:
            return start_worker_process(
                self.worker_module,
                env,
                log,
                concurrency=self.concurrency,
                pool=self.worker_pool,
                hostname=f"chaos{index}@%h" if index else None,  # Celery's node names differ
            )

    def _start_proxies(self) -> None:
        """The worker's proxies (``proxied``): its URLs for those services point at them."""
        if not self.proxied:
            return
        self.network = NetworkProxies().__enter__()
        services = {
            "postgres": ("DATABASE_URL", self.stack.database_url),
            "rabbitmq": ("CELERY_BROKER_URL", self.stack.broker_url),
            "redis": ("REDIS_URL", self.stack.redis_url),
            "llm": ("LLM_BASE_URL", self.simulator.base_url),
        }
        for service in self.proxied:
            variable, url = services[service]
            proxy = self.network.add(service, url, postgres=service == "postgres")
            self.proxies[service] = proxy
            self._worker_urls[variable] = proxied_url(url, proxy.port)

    def _stop_proxies(self) -> None:
        if self.network is None:
            return
        self.details["network"] = {
            name: {key: value for key, value in vars(proxy.stats).items() if value}
            for name, proxy in self.proxies.items()
        }
        self.network.__exit__(None, None, None)
        self.network = None

    async def run_and_count(self) -> tuple[Accounting, dict[str, int]]:
        """Steps 2 to 7: the run on its stack; its accounting and the worker's metrics."""
        database = Database.from_settings(self.settings)
        try:
            await upgrade(database)
            key = await self.open_tenant(database)
            await self._load_and_drain(database, key)
            self.details["worker_restarts"] = self.worker_restarts
            self.details["worker_exit_codes"] = [
                code for supervisor in self.supervisors for code in supervisor.exit_codes
            ][:10]
            return await self._account(database), self._metrics()
        finally:
            await database.dispose()

    async def _load_and_drain(self, database: Database, key: str) -> None:
        """Steps 2 to 6, and the worker stopped; the performance into ``details``."""
        from aura.gateway import Gateway, create_app
        from aura.gateway.senders import AmqpSender
        from aura.worker.celery_app import make_celery_app

        self.publisher = make_celery_app(self.settings)
        await self.before_load()
        self._start_proxies()
        relay_database, relay_publisher = self._relay_route(database)
        sender = AmqpSender(self.publisher) if self.amqp_gateway else None
        if sender is not None and relay_publisher is self.publisher:
            relay_publisher = sender
        self._start_workers()
        started = time.monotonic()
        self.recorder.begin(self.timeline_sources)
        relay = start_relay(relay_database, relay_publisher, self.settings)
        gateway = Gateway(
            database,
            self.publisher,
            {},
            sender=sender,
            scheduling=self.settings.tenant_scheduling,
        )
        gateway.dispatcher.start()  # as `aura gateway` runs it: through every fault
        try:
            async with self.gateway_client(create_app(gateway), key):
                await self.post_import(self.first_records())
                await Drain(self, database).run()
        finally:
            self.recorder.finish()
            relay.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await relay
            with contextlib.suppress(Exception):
                await gateway.dispatcher.aclose()
            if sender is not None:
                with contextlib.suppress(Exception):
                    await gateway.outbox.aclose()
            # Together: a worker stopping first would hand its deliveries to another.
            await asyncio.gather(
                *(asyncio.to_thread(supervisor.stop) for supervisor in self.supervisors)
            )
            if relay_database is not database:
                await relay_database.dispose()
            self._stop_proxies()
        elapsed = time.monotonic() - started
        self.details["elapsed_s"] = round(elapsed, 2)
        await self._performance(database, elapsed)

    def _relay_route(self, database: Database) -> tuple[Database, Any]:
        """The relay's database and publisher: through the proxies, where the worker's go."""
        from aura.worker.celery_app import make_celery_app

        if not self._worker_urls:
            return database, self.publisher
        relayed = self.settings.model_copy(
            update={
                "database_url": self._worker_urls.get("DATABASE_URL", self.settings.database_url),
                "celery_broker_url": self._worker_urls.get(
                    "CELERY_BROKER_URL", self.settings.celery_broker_url
                ),
            }
        )
        return Database.from_settings(relayed), make_celery_app(relayed)

    def _start_workers(self) -> None:
        self.supervisors = [
            WorkerSupervisor(functools.partial(self._launch, index))
            for index in range(self.workers)
        ]
        self.supervisor = self.supervisors[0]
        for supervisor in self.supervisors:
            supervisor.start()

    async def _account(self, database: Database) -> Accounting:
        """Step 7: every message counted, the worker stopped."""
        assert self.tenant_id is not None
        await self.before_count(database)
        broker = await asyncio.to_thread(
            functools.partial(read_broker, node=self.stack.rabbitmq_node),
            self.stack.broker_url,
            self.stack.vhost,
            self.stack.database_url,
        )
        async with database.session() as session:
            return await account(
                session,
                tenant_id=self.tenant_id,
                import_ids=self.import_ids,
                sent=self.sent,
                broker=broker,
                llm_requests=self.simulator.requests,
                llm_failed=sum(n for k, n in self.simulator.outcomes().items() if k != "ok"),
            )

    async def _performance(self, database: Database, elapsed: float) -> None:
        """Throughput, latency (a record's import to its enrichment's commit) and the
        worker's CPU per record, into ``details``."""
        assert self.tenant_id is not None
        assert self.supervisor is not None
        async with database.session() as session:
            counts = await tally(session, self.tenant_id, self.import_ids, latencies=True)
            await self.recorder.read_records(session, self.tenant_id, self.import_ids)
        latencies = sorted(counts.latencies_s)
        self.details["records_per_s"] = round(counts.enriched / elapsed, 1) if elapsed else 0.0
        self.details["latency_p50_s"] = round(percentile(latencies, 50), 3)
        self.details["latency_p99_s"] = round(percentile(latencies, 99), 3)
        cpu = sum(supervisor.cpu_s for supervisor in self.supervisors)
        self.details["worker_cpu_s"] = round(cpu, 2)
        self.details["worker_cpu_ms_per_record"] = (
            round(1000 * cpu / counts.enriched, 2) if counts.enriched else None
        )
        self.details["llm_latency_s"] = self.simulator.faults.latency
        self.details["concurrency"] = self.concurrency
        self.details["worker_pool"] = self.worker_pool

    async def tally_now(self, database: Database) -> Tally:
        assert self.tenant_id is not None
        async with database.session() as session:
            return await tally(session, self.tenant_id, self.import_ids)

    def queued_at_broker(self) -> int:
        """Messages in the run's vhost beyond the DLQ: work and delayed-retry queues."""
        depths = queue_depths(self.stack.vhost, self.stack.rabbitmq_node)
        return sum(count for name, count in depths.items() if name != DEAD_LETTER_QUEUE)

    def read_letters(self) -> list[DeadLetter]:
        with Connection(self.stack.broker_url, connect_timeout=5) as connection:
            return DeadLetterQueue(connection, self.stack.database_url).list(
                limit=100_000, raw=True
            )

    def _registry(self) -> CollectorRegistry:
        """Every launch's metric files (``metric_dirs``) as one registry."""
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        for directory in list(self.metric_dirs):  # a supervisor's thread may append
            MultiProcessCollector(registry, path=str(directory))
        return registry

    def timeline_sources(self) -> list[Source]:
        """The workers' metrics and the run's queues (passive declares), every second."""
        return [metric_source(self._registry), probe_source(self.stack.broker_url, self.publisher)]

    def _metrics(self) -> dict[str, int]:
        registry = self._registry()
        wanted = {
            "retries": ("aura_task_retries_total", {"kind": "retry"}),
            "deferrals": ("aura_task_retries_total", {"kind": "deferral"}),
            "breaker_opens": ("llm_circuit_breaker_opens_total", {}),
            "soft_timeouts": ("celery_task_timeouts_total", {"kind": "soft"}),
            "hard_timeouts": ("celery_task_timeouts_total", {"kind": "hard"}),
            "network_rollbacks": (
                "database_transaction_rollbacks_total",
                {"reason": "network_error"},
            ),
            "duplicate_deliveries": ("aura_duplicate_deliveries_total", {}),
        }
        return {
            key: metric_total(registry, name, **labels) for key, (name, labels) in wanted.items()
        }


def _has_letter(sent: Sent, letters: list[DeadLetter]) -> bool:
    marker = sent.marker
    if marker is not None:
        return any(carries(x, marker) for x in letters)
    return any(x.message_id == sent.message_id for x in letters)
