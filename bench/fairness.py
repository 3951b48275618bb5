"""Tenants' completion times with a big import running: fair dispatch against FIFO, same run.

    .venv/bin/python bench/fairness.py [--big 3000] [--small 10] [--at 3 10]
        [--latency 0.2] [--concurrency 50] [--workers 2] [--gateways 2]

For each scheduling (TENANT_SCHEDULING=fifo, then fair; the workers are restarted with it),
one phase: tenant A posts an import of ``--big`` records; at each moment of ``--at``
(seconds after A's 202) a new tenant B<k> posts an import of ``--small`` records and a new
tenant C<k> posts ``--small`` single products (on the other gateway). A record's
completion time is its enrichment's time minus its post's. Printed per tenant kind: p50,
p99 and max, and A's records/s; then fair/fifo ratios.

Real parts (``tests/fairness_scenario.py``): worker processes (async pool) on RabbitMQ
(its own vhost ``aura_bench_fair``, made and removed here), PostgreSQL (``aura_bench``,
made if missing, migrated), Redis (db 14 of 127.0.0.1, the bench's own), the LLM
simulator in its own process at ``--latency``, and ``--gateways`` gateways in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fairness_scenario import Phase, describe, running_platform  # noqa: E402

from aura.catalog import upgrade  # noqa: E402
from aura.db import Database  # noqa: E402

VHOST = "aura_bench_fair"
DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/aura_bench"
REDIS_URL = "redis://127.0.0.1:6379/14"


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


async def ensure_database() -> None:
    import asyncpg

    admin = await asyncpg.connect(host="127.0.0.1", user="postgres", database="postgres")
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = 'aura_bench'"):
            await admin.execute('CREATE DATABASE "aura_bench"')
    finally:
        await admin.close()


async def one(args: argparse.Namespace, scheduling: str, logs: Path) -> Phase:
    database = Database(DATABASE_URL, pool_size=10, max_overflow=5)
    await upgrade(database)
    try:
        async with running_platform(
            database,
            database_url=DATABASE_URL,
            amqp_url=f"amqp://guest:guest@127.0.0.1:5672/{VHOST}",
            redis_url=REDIS_URL,
            workers=args.workers,
            gateways=args.gateways,
            concurrency=args.concurrency,
            latency=args.latency,
            logs=logs,
            scheduling=scheduling,
            worker_scheduling=os.environ.get("BENCH_WORKER_SCHEDULING"),
        ) as platform:
            return await platform.run_phase(
                scheduling, big=args.big, small=args.small, at=args.at, within=args.timeout
            )
    finally:
        await database.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--big", type=int, default=3000)
    parser.add_argument("--small", type=int, default=10)
    parser.add_argument("--at", type=float, nargs="+", default=[3.0, 10.0])
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    asyncio.run(ensure_database())
    phases: dict[str, Phase] = {}
    for scheduling in ("fifo", "fair"):
        rabbitmqctl("add_vhost", VHOST)
        rabbitmqctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
        try:
            with tempfile.TemporaryDirectory() as logs:
                phases[scheduling] = asyncio.run(one(args, scheduling, Path(logs)))
        finally:
            rabbitmqctl("delete_vhost", VHOST)
        print(describe(phases[scheduling]), flush=True)
        if os.environ.get("BENCH_SAMPLES"):
            t0 = phases[scheduling].samples[0][0] if phases[scheduling].samples else 0
            print(" ".join(f"{t - t0:.0f}:{a}/{b}" for t, a, b in phases[scheduling].samples))
    fifo, fair = phases["fifo"].summary(), phases["fair"].summary()
    print(f"\nbig={args.big} small={args.small} at={args.at} latency={args.latency}s")
    print(f"{'tenant':<7}{'fifo p99':>10}{'fair p99':>10}{'fifo max':>10}{'fair max':>10}")
    for label in fair:
        print(
            f"{label:<7}{fifo[label]['p99']:>9.1f}s{fair[label]['p99']:>9.1f}s"
            f"{fifo[label]['max']:>9.1f}s{fair[label]['max']:>9.1f}s"
        )
    ratio = phases["fair"].big_rate / phases["fifo"].big_rate if phases["fifo"].big_rate else 0
    print(f"A's records/s: fifo {phases['fifo'].big_rate:.0f}, fair {phases['fair'].big_rate:.0f}")
    print(f"A fair/fifo: {ratio:.2f}")
    for phase in phases.values():
        lost = phase.big_records + 2 * args.small * len(args.at) - phase.enrichments
        print(f"{phase.scheduling}: lost or unfinished {lost}, pending {phase.pending}")


if __name__ == "__main__":
    main()
