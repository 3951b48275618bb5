"""Tenants sharing the platform: a big import, then small tenants' work, timed per tenant.

Used by ``tests/worker/test_tenant_fairness.py`` and ``bench/fairness.py``. Real parts:
worker processes (``aura.worker.tasks``, async pool) on RabbitMQ, PostgreSQL, Redis, the
LLM simulator in its own process at a fixed latency, and gateways (``Gateway`` with the
``AmqpSender`` ``aura gateway`` uses, each with its own dispatcher) in this process,
served over ASGI. Each phase makes its own tenants:

    big      tenant "A": one import of ``big`` records, posted at 0 s
    later    at each moment in ``at``: tenant "B<k>" posts an import of ``small`` records
             (to the next gateway) and tenant "C<k>" posts ``small`` single products

A record's latency is its enrichment's time (the worker's clock) minus its post's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
from sqlalchemy import func, select

from aura.catalog import Enrichment, ImportRecord, Product
from aura.config import Settings
from aura.contract import PLATFORM_QUEUES
from aura.db import Database, OutboxMessage
from aura.gateway import Gateway, create_app, create_tenant_with_key
from aura.gateway.senders import AmqpSender
from aura.worker.celery_app import make_celery_app
from aura.worker.process import start_worker_process, stop_worker_process

__all__ = ["Phase", "Platform", "percentile", "running_platform"]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


@dataclass
class Phase:
    """What one phase saw: per tenant label, the latencies of its records (s)."""

    scheduling: str
    latencies: dict[str, list[float]] = field(default_factory=dict)
    posted: dict[str, float] = field(default_factory=dict)
    big_records: int = 0
    big_seconds: float = 0.0  # from A's post to A's last enrichment
    products: int = 0
    enrichments: int = 0
    pending: int = 0
    dead_lettered: int = 0
    gateway_cpu: float = 0.0  # CPU seconds of this process (the gateways) in the phase
    worker_cpu: float = 0.0  # of the worker processes
    samples: list[tuple[float, ...]] = field(default_factory=list)

    @property
    def big_rate(self) -> float:
        return self.big_records / self.big_seconds if self.big_seconds else 0.0

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            label: {
                "n": len(v),
                "p50": percentile(v, 50),
                "p99": percentile(v, 99),
                "max": max(v, default=float("nan")),
            }
            for label, v in sorted(self.latencies.items())
        }


def _record(label: str, i: int) -> str:
    return json.dumps(
        {
            "title": f"{label} item {i}",
            "category": "bench",
            "variants": [{"sku": f"{label}-{i}-{uuid.uuid4().hex[:6]}", "price": "9.90"}],
        }
    )


@dataclass
class Platform:
    database: Database
    gateways: list[Gateway]
    clients: list[httpx.AsyncClient]
    workers: list[int] = field(default_factory=list)  # their pids

    def worker_cpu(self) -> float:
        total = 0.0
        for pid in self.workers:
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    async def tenant(self, label: str) -> tuple[uuid.UUID, dict[str, str]]:
        async with self.database.session() as session:
            made, key = await create_tenant_with_key(session, f"{label}-{uuid.uuid4().hex[:8]}")
            await session.commit()
        return made.id, {"X-API-Key": key}

    async def post_import(self, gateway: int, label: str, size: int) -> uuid.UUID:
        tenant, key = await self.tenant(label)
        body = "\n".join(_record(label, i) for i in range(size)).encode()
        answer = await self.clients[gateway % len(self.clients)].post(
            f"/v1/tenants/{tenant}/imports",
            content=body,
            headers={**key, "content-type": "application/x-ndjson"},
            timeout=300,
        )
        assert answer.status_code == 202, answer.text
        return tenant

    async def post_products(self, gateway: int, label: str, size: int) -> uuid.UUID:
        tenant, key = await self.tenant(label)
        client = self.clients[gateway % len(self.clients)]
        answers = await asyncio.gather(
            *(
                client.post(
                    f"/v1/tenants/{tenant}/products",
                    content=_record(label, i).encode(),
                    headers={**key, "content-type": "application/json"},
                )
                for i in range(size)
            )
        )
        assert all(a.status_code == 201 for a in answers), [a.text for a in answers]
        return tenant

    async def run_phase(
        self, scheduling: str, *, big: int, small: int, at: Sequence[float], within: float
    ) -> Phase:
        """A's import, then B's and C's at each of ``at`` seconds; waits (at most
        ``within`` seconds) until every record is enriched or dead-lettered."""
        for gateway in self.gateways:
            gateway.scheduling = scheduling
        phase = Phase(scheduling, big_records=big)
        tenants: dict[str, uuid.UUID] = {}
        cpu, worker_cpu = time.process_time(), self.worker_cpu()
        start = time.time()
        tenants["A"] = await self.post_import(0, "A", big)
        phase.posted["A"] = start
        later = []
        for k, moment in enumerate(at):
            later.append(asyncio.create_task(self._later(phase, tenants, k, start + moment, small)))
        await asyncio.gather(*later)
        sampler = asyncio.create_task(self._sample(phase))
        await self._wait_done(phase, tenants, big + 2 * small * len(at), within)
        sampler.cancel()
        phase.gateway_cpu = time.process_time() - cpu
        phase.worker_cpu = self.worker_cpu() - worker_cpu
        return phase

    async def _sample(self, phase: Phase) -> None:
        dispatcher = self.gateways[0].dispatcher
        while True:
            depths = [await dispatcher.sender_depth(q) for q in PLATFORM_QUEUES]
            phase.samples.append((time.time(), *depths))
            await asyncio.sleep(0.5)

    async def _later(
        self, phase: Phase, tenants: dict[str, uuid.UUID], k: int, when: float, small: int
    ) -> None:
        await asyncio.sleep(max(0.0, when - time.time()))
        phase.posted[f"B{k}"] = phase.posted[f"C{k}"] = time.time()
        b, c = await asyncio.gather(
            self.post_import(k + 1, f"B{k}", small), self.post_products(k, f"C{k}", small)
        )
        tenants[f"B{k}"], tenants[f"C{k}"] = b, c

    async def _wait_done(
        self, phase: Phase, tenants: dict[str, uuid.UUID], total: int, within: float
    ) -> None:
        ids = list(tenants.values())
        deadline = time.monotonic() + within
        while True:
            async with self.database.session() as session:
                enriched = await session.scalar(
                    select(func.count())
                    .select_from(Enrichment)
                    .where(Enrichment.tenant_id.in_(ids))
                )
                dead = await session.scalar(
                    select(func.count())
                    .select_from(ImportRecord)
                    .where(ImportRecord.tenant_id.in_(ids), ImportRecord.status == "dead_lettered")
                )
            if int(enriched or 0) + int(dead or 0) >= total or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
        await self._collect(phase, tenants)

    async def _collect(self, phase: Phase, tenants: dict[str, uuid.UUID]) -> None:
        by_id = {tenant: label for label, tenant in tenants.items()}
        ids = list(tenants.values())
        async with self.database.session() as session:
            rows = (
                await session.execute(
                    select(Enrichment.tenant_id, Enrichment.created_at).where(
                        Enrichment.tenant_id.in_(ids)
                    )
                )
            ).all()
            phase.products = int(
                await session.scalar(
                    select(func.count()).select_from(Product).where(Product.tenant_id.in_(ids))
                )
                or 0
            )
            phase.pending = int(
                await session.scalar(
                    select(func.count())
                    .select_from(ImportRecord)
                    .where(ImportRecord.tenant_id.in_(ids), ImportRecord.status == "pending")
                )
                or 0
            )
            phase.dead_lettered = int(
                await session.scalar(
                    select(func.count())
                    .select_from(ImportRecord)
                    .where(ImportRecord.tenant_id.in_(ids), ImportRecord.status == "dead_lettered")
                )
                or 0
            )
        phase.enrichments = len(rows)
        last_big = 0.0
        for tenant, created in rows:
            label = by_id[tenant]
            done = _epoch(created)
            phase.latencies.setdefault(label.rstrip("0123456789"), []).append(
                done - phase.posted[label]
            )
            if label == "A":
                last_big = max(last_big, done)
        phase.big_seconds = last_big - phase.posted["A"] if last_big else 0.0

    async def outbox_left(self) -> int:
        async with self.database.session() as session:
            return int(await session.scalar(select(func.count()).select_from(OutboxMessage)) or 0)


def _epoch(moment: datetime) -> float:
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


@contextlib.contextmanager
def llm_simulator(latency: float, env: dict[str, str]) -> Iterator[str]:
    """``aura llm-sim`` in its own process (a thread here would take the gateways' GIL)."""
    from tests.services import free_port

    port = free_port()
    command = [sys.executable, "-m", "aura", "llm-sim", "--port", str(port)]
    command += ["--latency", str(latency)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the LLM simulator did not start") from None
                time.sleep(0.1)
        yield f"{base}/v1"
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextlib.asynccontextmanager
async def running_platform(
    database: Database,
    *,
    database_url: str,
    amqp_url: str,
    redis_url: str,
    workers: int,
    gateways: int,
    concurrency: int,
    latency: float,
    logs: Path,
    scheduling: str,
    worker_scheduling: str | None = None,
) -> AsyncIterator[Platform]:
    """Workers (their own processes), the simulator and ``gateways`` gateways, all on the
    given services; stopped after (workers warm, bounded)."""
    base_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CELERY_", "REDIS_", "LLM_", "DATABASE_", "TENANT_", "OUTBOX_"))
    }
    with llm_simulator(latency, base_env) as llm_url:
        env = {
            **base_env,
            "CELERY_BROKER_URL": amqp_url,
            "REDIS_URL": redis_url,
            "DATABASE_URL": database_url,
            "LLM_BASE_URL": llm_url,
            "TENANT_SCHEDULING": worker_scheduling or scheduling,
            "DB_POOL_SIZE": "10",  # two workers and the gateways within max_connections
            "DB_MAX_OVERFLOW": "10",
            "WORKER_METRICS_PORT": "0",
            "LOG_LEVEL": "WARNING",
        }
        processes: list[subprocess.Popen[bytes]] = []
        outputs = contextlib.ExitStack()
        built: list[Gateway] = []
        clients: list[httpx.AsyncClient] = []
        try:
            for n in range(workers):
                output = outputs.enter_context((logs / f"worker-{n}.log").open("wb"))
                processes.append(
                    start_worker_process(
                        "aura.worker.tasks",
                        env,
                        output,
                        pool="async",
                        concurrency=concurrency,
                        queues=PLATFORM_QUEUES,
                        hostname=f"fair{n}@%h",
                    )
                )
            publisher = make_celery_app(Settings(celery_broker_url=amqp_url))
            for _ in range(gateways):
                gateway = Gateway(
                    database, publisher, {}, sender=AmqpSender(publisher), scheduling=scheduling
                )
                gateway.dispatcher.start()
                built.append(gateway)
                transport = httpx.ASGITransport(app=create_app(gateway))
                clients.append(httpx.AsyncClient(transport=transport, base_url="http://gw"))
            await _workers_consuming(publisher, workers)
            yield Platform(database, built, clients, [p.pid for p in processes])
        finally:
            for client in clients:
                await client.aclose()
            for gateway in built:
                await gateway.dispatcher.aclose()
                await gateway.outbox.aclose()
            for process in processes:
                stop_worker_process(process, timeout=60)
            outputs.close()


async def _workers_consuming(publisher: object, workers: int) -> None:
    """Bounded wait until ``workers`` consumers are on each work queue."""
    deadline = time.monotonic() + 60
    while True:
        counts = await asyncio.to_thread(_consumers, publisher)
        if min(counts) >= workers:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the workers did not start consuming: {counts}")
        await asyncio.sleep(0.2)


def _consumers(publisher: object) -> list[int]:
    with publisher.connection_for_read() as connection:  # type: ignore[attr-defined]
        channel = connection.default_channel
        found = []
        for queue in PLATFORM_QUEUES:
            try:
                found.append(int(channel.queue_declare(queue, passive=True).consumer_count))
            except Exception:
                return [0]
        return found


def describe(phase: Phase) -> str:
    rows = [
        f"  {phase.scheduling}: A {phase.big_records} records at {phase.big_rate:.0f}/s; CPU s: "
        f"gateways {phase.gateway_cpu:.1f}, workers {phase.worker_cpu:.1f}"
    ]
    for label, stats in phase.summary().items():
        rows.append(
            f"    {label:<3} n={stats['n']:>6.0f}  p50={stats['p50']:6.1f}s  "
            f"p99={stats['p99']:6.1f}s  max={stats['max']:6.1f}s"
        )
    return "\n".join(rows)
