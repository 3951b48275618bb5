"""Throughput of the platform's ingest + enrich path against a plain Celery task, same run.

    .venv/bin/python bench/platform_throughput.py [--records N] [--rounds R]

One prefork worker (concurrency 2, both work queues) runs ``aura.worker.tasks`` and a
plain baseline task (``bench/bench_platform_tasks.py``) on the same app, broker (its own
vhost, made and removed here) and PostgreSQL database (``aura_bench``, made if missing and
migrated with ``aura.catalog.upgrade``). The LLM simulator runs in its own process
(``aura llm-sim``: zero latency, no faults; a thread of this process would take the GIL
from the publisher in the platform's rounds only) and the worker reaches it through
LLM_BASE_URL.

Each round makes a tenant and publishes N valid catalog records on bulk_queue, timed from
the first publish until the round's work is in the database:

    ingest+enrich  N ``aura.ingest_product`` messages (with an import, as the gateway
                   makes them); each one writes the product, its variants, its inbox row
                   and its import record, then queues ``aura.enrich_product``, which
                   reads the product, asks the LLM and writes the enrichment: 2 messages
                   and 1 LLM call per record. Done when N enrichments exist.
    plain write    N ``bench.plain_ingest`` messages; each one writes the product and its
                   variants with ``create_product_with_variants``: 1 message per record.
                   Done when N products exist.

Rounds alternate kinds; the best round of each counts. CPU time of the worker (main
process and pool children) and of the simulator is read from /proc per round. After the
rounds, the steps of each path are timed one record at a time in this process, with
their PostgreSQL round trips counted (where the time goes): the tasks' own code, called
directly, with no worker (the enrich messages it publishes stay in the queue). Target
(DESIGN.md): ingest+enrich >= 0.8 x plain, in records per second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import redis
from sqlalchemy import event, func, select
from sqlalchemy.engine import make_url

from aura.catalog import (
    Enrichment,
    Product,
    create_import,
    create_product_with_variants,
    create_tenant,
    parse_product,
    upgrade,
)
from aura.catalog.pipeline import ingest_record, read_for_prompt, store_enrichment
from aura.config import Settings
from aura.contract import BULK_QUEUE, ENRICH_TASK, INGEST_TASK, REALTIME_QUEUE
from aura.db import Database, Staged
from aura.gateway.senders import AmqpSender
from aura.llm import ResilientLLMClient
from aura.messaging.topology import DEAD_LETTER_QUEUE
from aura.worker import tasks as platform
from aura.worker.celery_app import make_celery_app
from aura.worker.process import start_worker_process, stop_worker_process

ROOT = Path(__file__).resolve().parent.parent
VHOST = "aura_bench"
PLATFORM, PLAIN = "ingest+enrich", "plain write"
WARM_UP = 20
SEND_BATCH = 500  # the gateway's outbox publishes an import's messages in batches
POLL = 0.05
TIMEOUT = 600
TICKS = os.sysconf("SC_CLK_TCK")


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


def record(run: str, index: int) -> str:
    """One valid catalog record, its SKUs unique within the tenant."""
    return json.dumps(
        {
            "title": f"Trail runner {index}",
            "brand": "Aura Bench",
            "category": "running shoes",
            "description": "A light shoe for long days on rough ground.",
            "variants": [
                {"sku": f"B-{run}-{index}-40", "price": "89.90", "attributes": {"size": 40}},
                {"sku": f"B-{run}-{index}-42", "price": "89.90", "attributes": {"size": 42}},
            ],
        }
    )


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def cpu_seconds(pid: int, *, reaped_children: bool = False) -> float:
    """User + system CPU time of ``pid`` (utime, stime of /proc/PID/stat), or of its
    children that have exited and been waited for (cutime, cstime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    first = 13 if reaped_children else 11
    return (int(fields[first]) + int(fields[first + 1])) / TICKS


async def ensure_database(url: str) -> None:
    parsed = make_url(url)
    name = parsed.database
    if name in (None, "aura_test", "aura_demo", "test", "postgres"):
        raise SystemExit(f"refusing to use database {name!r}")
    admin = await asyncpg.connect(
        host=parsed.host, port=parsed.port or 5432, user=parsed.username, database="postgres"
    )
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()


class Store:
    """The bench's own view of the database (tenants, imports, counts). It counts its
    PostgreSQL round trips: asyncpg sends one request and waits for its answer, so each
    write to a connection's transport is one round trip."""

    def __init__(self, url: str) -> None:
        self.database = Database(url, pool_size=2, max_overflow=0)
        self.round_trips = 0
        event.listen(self.database.engine.sync_engine, "connect", self._count_writes)

    def _count_writes(self, dbapi_connection: Any, _: Any) -> None:
        transport = dbapi_connection.driver_connection._transport
        write = transport.write

        def counted(data: Any) -> None:
            self.round_trips += 1
            write(data)

        transport.write = counted

    async def tenant(self, kind: str) -> uuid.UUID:
        async with self.database.session() as session:
            made = await create_tenant(session, f"bench {kind} {uuid.uuid4().hex[:12]}")
        return made.id

    async def import_of(self, tenant: uuid.UUID, records: int) -> tuple[str, list[str]]:
        async with self.database.session() as session:
            batch, message_ids = await create_import(session, tenant, records)
        return str(batch.id), message_ids

    async def count(self, model: type[Enrichment] | type[Product], tenant: uuid.UUID) -> int:
        async with self.database.session() as session:
            found = await session.scalar(
                select(func.count()).select_from(model).where(model.tenant_id == tenant)
            )
        return int(found or 0)


@dataclass(frozen=True)
class Mode:
    """How the worker runs: its pool, tasks in flight per process, processes, and the
    simulator's latency per answer."""

    pool: str = "prefork"
    concurrency: int = 2
    processes: int = 1
    latency: float = 0.0


class Processes:
    """The pids whose CPU time a round is charged with."""

    def __init__(self, workers: list[int], simulator: int) -> None:
        self.workers, self.simulator = workers, simulator

    def sample(self) -> tuple[float, float, float]:
        # Pool children are replaced every CELERY_WORKER_MAX_TASKS_PER_CHILD tasks (1000,
        # the default, kept): the live ones, plus those the worker has reaped. The async
        # pool has none: its work is in the main figure.
        main = sum(cpu_seconds(worker) for worker in self.workers)
        pool = sum(cpu_seconds(worker, reaped_children=True) for worker in self.workers)
        pool += sum(cpu_seconds(c) for worker in self.workers for c in children(worker))
        return main, pool, cpu_seconds(self.simulator)


def run_round(
    sender: AmqpSender,
    runner: asyncio.Runner,
    store: Store,
    procs: Processes,
    kind: str,
    records: int,
) -> dict[str, float]:
    """Publish one round; return its wall time, publishing time and CPU times."""
    tenant = runner.run(store.tenant(kind))
    run = uuid.uuid4().hex[:10]
    raws = [record(run, i) for i in range(records)]
    if kind == PLATFORM:
        import_id, message_ids = runner.run(store.import_of(tenant, records))
    if kind == PLATFORM:  # the gateway's messages for an import, as its outbox sends them
        staged = [
            Staged(
                message_ids[i],
                tenant,
                INGEST_TASK,
                BULK_QUEUE,
                [raw, str(tenant)],
                {"import_id": import_id},
            )
            for i, raw in enumerate(raws)
        ]
    else:
        staged = [
            Staged(str(uuid.uuid4()), tenant, "bench.plain_ingest", BULK_QUEUE, [raw, str(tenant)])
            for raw in raws
        ]
    cpu_before = procs.sample()
    started = time.perf_counter()
    for first in range(0, len(staged), SEND_BATCH):
        _, failure = runner.run(sender.send(staged[first : first + SEND_BATCH]))
        if failure is not None:
            raise SystemExit(f"publishing the round failed: {failure!r}")
    published = time.perf_counter() - started
    model = Enrichment if kind == PLATFORM else Product
    deadline = time.monotonic() + TIMEOUT
    while runner.run(store.count(model, tenant)) < records:
        if time.monotonic() > deadline:
            raise SystemExit(f"{kind}: not finished within {TIMEOUT} s")
        time.sleep(POLL)
    seconds = time.perf_counter() - started
    main_cpu, pool_cpu, sim_cpu = (b - a for a, b in zip(cpu_before, procs.sample(), strict=True))
    return {
        "seconds": seconds,
        "published": published,
        "main": main_cpu,
        "pool": pool_cpu,
        "simulator": sim_cpu,
    }


class Steps:
    """Wall time and PostgreSQL round trips of each named step: ``with steps("name"):``."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.spent: dict[str, float] = {}
        self.round_trips: dict[str, int] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started, trips = time.perf_counter(), self.store.round_trips
        try:
            yield
        finally:
            self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - started
            self.round_trips[name] = self.round_trips.get(name, 0) + self.store.round_trips - trips


async def serial_costs(
    store: Store, app: Any, settings: Settings, records: int
) -> dict[str, tuple[float, float]]:
    """Milliseconds and PostgreSQL round trips per record of each step of both paths, one
    record at a time: the code the tasks run (``aura.worker.tasks``' helpers), called
    directly."""
    tenant = await store.tenant("serial")
    _, message_ids = await store.import_of(tenant, records + 1)
    llm = ResilientLLMClient(settings=settings)
    database = store.database
    run = uuid.uuid4().hex[:10]
    steps = Steps(store)
    try:
        for index in range(records + 1):
            if index == 1:  # the first record prepared the statements: not counted
                steps = Steps(store)
            with steps("plain: product + variants tx"):
                async with database.session() as session:
                    data = json.loads(record(run + "p", index))
                    await create_product_with_variants(session, tenant, data)
            with steps("ingest: inbox + product + variants + record (1 stmt)"):
                product = parse_product(json.loads(record(run, index)))
                ingested = await ingest_record(
                    database,
                    tenant,
                    product,
                    message_id=message_ids[index],
                    task=INGEST_TASK,
                    fingerprint="bench",
                )
                product_id = ingested.product_id
            with steps("ingest: publish the enrich message (confirmed)"):
                app.send_task(
                    ENRICH_TASK,
                    args=[str(product_id), str(tenant)],
                    task_id=f"enrich-{product_id}",
                    queue=REALTIME_QUEUE,
                )
            with steps("enrich: read product + SKUs (1 stmt)"):
                facts = await read_for_prompt(database, tenant, product_id)
                assert facts is not None
                prompt = platform._prompt(facts)
            with steps("enrich: LLM call (simulator)"):
                completion = await llm.complete(prompt, temperature=0.2)
            with steps("enrich: inbox + enrichment upsert (1 stmt)"):
                answer = platform._EnrichmentAnswer.model_validate_json(completion.text)
                await store_enrichment(
                    database,
                    tenant,
                    product_id,
                    description=answer.description,
                    tags=answer.tags,
                    model=completion.model,
                    message_id=f"enrich-{product_id}",
                    task=ENRICH_TASK,
                    fingerprint="bench",
                )
    finally:
        await llm.aclose()
    return {
        step: (total / records * 1000, steps.round_trips[step] / records)
        for step, total in steps.spent.items()
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_simulator(env: dict[str, str], latency: float) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "aura", "llm-sim", "--port", str(port)]
    command += ["--latency", str(latency)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=1):
                return process, f"{base}/v1"
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise SystemExit("the LLM simulator did not start") from None
            time.sleep(0.1)


def simulator_stats(base_url: str) -> dict[str, Any]:
    url = base_url.removesuffix("/v1") + "/admin/stats"
    with urllib.request.urlopen(url, timeout=5) as answer:
        stats: dict[str, Any] = json.load(answer)
    return stats


def dead_letters(app: Any) -> int:
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        return int(channel.queue_declare(DEAD_LETTER_QUEUE, passive=True).message_count)


def main(
    records: int,
    rounds: int,
    serial: int,
    database_url: str,
    redis_url: str,
    mode: Mode,
) -> None:
    runner = asyncio.Runner()
    runner.run(ensure_database(database_url))
    store = Store(database_url)
    runner.run(upgrade(store.database))
    client = redis.Redis.from_url(redis_url)
    keys_before = set(client.scan_iter())
    rabbitmqctl("add_vhost", VHOST)
    rabbitmqctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
    broker = f"amqp://guest:guest@127.0.0.1:5672/{VHOST}"
    env = {
        **os.environ,
        "CELERY_BROKER_URL": broker,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "PYTHONPATH": str(ROOT),
        "LOG_LEVEL": "WARNING",
    }
    simulator, llm_url = start_simulator(env, mode.latency)
    env["LLM_BASE_URL"] = llm_url
    if mode.latency:  # timeouts above the latency; pools kept (no overflow churn)
        env |= {"LLM_READ_TIMEOUT": "30", "LLM_CALL_DEADLINE": "60"}
        env |= {"DB_POOL_SIZE": "25", "DB_MAX_OVERFLOW": "0"}
    workers = [
        start_worker_process(
            "bench.bench_platform_tasks",
            env,
            queues=[REALTIME_QUEUE, BULK_QUEUE],
            cwd=ROOT,
            pool=mode.pool,
            concurrency=mode.concurrency,
            hostname=f"bench{i}@%h",
        )
        for i in range(mode.processes)
    ]
    # The plain baseline is a `def` task: prefork's. The async pool runs the platform only.
    kinds = [PLATFORM] if mode.pool == "async" else [PLATFORM, PLAIN]
    results: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    try:
        settings = Settings(
            celery_broker_url=broker,
            database_url=database_url,
            redis_url=redis_url,
            llm_base_url=llm_url,
        )
        app = make_celery_app(settings)
        sender = AmqpSender(app)
        procs = Processes([w.pid for w in workers], simulator.pid)
        for kind in results:  # warm-up: the worker's loops, pools and LLM client
            run_round(sender, runner, store, procs, kind, WARM_UP)
        for _ in range(rounds):
            for kind in results:
                results[kind].append(run_round(sender, runner, store, procs, kind, records))
        runner.run(sender.close())
        stats = simulator_stats(llm_url)
        for each in workers:
            stop_worker_process(each)
        dead = dead_letters(app)
        costs = runner.run(serial_costs(store, app, settings, serial)) if serial else {}
    finally:
        for each in workers:
            if each.poll() is None:
                stop_worker_process(each)
        simulator.terminate()
        simulator.wait(timeout=30)
        rabbitmqctl("delete_vhost", VHOST)
        created = [key for key in client.scan_iter() if key not in keys_before]
        if created:
            client.delete(*created)
        client.close()
        runner.run(store.database.dispose())
        runner.close()
    report(records, rounds, results, stats, dead, costs, serial, mode)


def report(
    records: int,
    rounds: int,
    results: dict[str, list[dict[str, float]]],
    stats: dict[str, Any],
    dead: int,
    costs: dict[str, tuple[float, float]],
    serial: int,
    mode: Mode,
) -> None:
    messages = {PLATFORM: 2, PLAIN: 1}  # broker messages per record
    rates = {kind: [records / r["seconds"] for r in runs] for kind, runs in results.items()}
    best = {kind: max(values) for kind, values in rates.items()}
    print(
        f"records per round: {records:,}; rounds: {rounds}; {mode.processes} x {mode.pool}"
        f" worker, concurrency {mode.concurrency}; LLM latency {mode.latency:g} s"
    )
    if mode.latency:
        limit = mode.processes * mode.concurrency / mode.latency
        shares = [100 * rate / limit for rate in rates[PLATFORM]]
        print(
            f"ingest+enrich: {statistics.median(rates[PLATFORM]):.1f} enriched/s ="
            f" {statistics.median(shares):.1f} % of the limit, median of {len(shares)}"
            f" [{min(shares):.1f}-{max(shares):.1f}]"
            f" ({mode.processes * mode.concurrency} in flight / {mode.latency:g} s; target >= 90 %)"
        )
    for kind, values in rates.items():
        shown = ", ".join(f"{value:,.0f}" for value in values)
        print(
            f"{kind:<14} best {best[kind]:7,.1f} records/s {best[kind] * messages[kind]:7,.1f}"
            f" msg/s   (rounds, records/s: {shown})"
        )
    print("CPU per record, mean of rounds (ms): worker main / pool children / LLM simulator")
    for kind, runs in results.items():
        total = records * len(runs)
        main_ms, pool_ms, sim_ms = (
            sum(r[part] for r in runs) / total * 1000 for part in ("main", "pool", "simulator")
        )
        publish = min(r["published"] for r in runs)
        print(
            f"  {kind:<14} {main_ms:5.2f} / {pool_ms:5.2f} / {sim_ms:5.2f}"
            f"   (publishing the round took >= {publish:.2f} s of it)"
        )
    expected = records * rounds + WARM_UP
    print(
        f"LLM requests: {stats['requests']:,} (expected {expected:,}, 1 per record);"
        f" outcomes {stats['by_outcome']}; dead letters: {dead}"
    )
    if costs:
        print(f"serial cost per record, one at a time in this process ({serial} records):")
        print(f"  {'step':<54} {'ms':>6}  PostgreSQL round trips")
        for step, (ms, trips) in costs.items():
            print(f"  {step:<54} {ms:6.2f}  {trips:4.1f}")
        for name, plain in ((PLAIN, True), (PLATFORM, False)):
            chosen = [cost for step, cost in costs.items() if step.startswith("plain") == plain]
            ms, trips = sum(c[0] for c in chosen), sum(c[1] for c in chosen)
            print(f"  {name + ' total':<54} {ms:6.2f}  {trips:4.1f}")
    if PLAIN not in best:
        return
    ratio = best[PLATFORM] / best[PLAIN]
    print("--- ratios")
    print(f"ingest+enrich / plain, records/s: {ratio:.3f}  (2 messages + 1 LLM call vs 1 message)")
    print(f"ingest+enrich / plain, msg/s:     {ratio * 2:.3f}")
    met = "MET" if ratio >= 0.8 else "NOT MET"
    print(f"target ingest+enrich >= 0.8 x plain (records/s): {ratio:.3f}, {met}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--serial", type=int, default=100, help="records timed step by step (0: skip)"
    )
    parser.add_argument(
        "--database-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/aura_bench"
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--pool", default="prefork", choices=["prefork", "async"])
    parser.add_argument("--concurrency", type=int, default=2, help="per process")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--llm-latency", type=float, default=0.0, help="seconds per answer")
    args = parser.parse_args()
    chosen = Mode(args.pool, args.concurrency, args.processes, args.llm_latency)
    main(args.records, args.rounds, args.serial, args.database_url, args.redis_url, chosen)
