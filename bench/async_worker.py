"""LLM-bound throughput of one worker node: Aura's async pool against Celery's threads pool.

    .venv/bin/python bench/async_worker.py [--latency 1.0] [--records 1500] [--rounds 1]

The job (``bench/bench_async_tasks.py``): one chat completion from the LLM simulator,
which answers after ``--latency`` seconds, and one PostgreSQL row per record.

    aura async c=100    one process, AsyncPool, 100 in flight, every guarantee on
    aura async c=500    two processes x 250 in flight (this machine has 2 cores)
    celery threads c=100  one process, Celery's threads pool, sync httpx + psycopg

Each round publishes N records and is timed from the first publish until N rows exist;
CPU is the worker processes' (user + system, from /proc) over the round, divided by N.
The limit a round can reach is in-flight / latency records/s; the report prints each
round's share of it and the ratio of Aura c=100 to Celery threads c=100. Everything
runs on its own vhost, PostgreSQL database (``aura_bench_async``) and Redis db 9, made
here and removed at the end; the simulator runs in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import redis

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
VHOST = "aura_bench_async"
DATABASE = "aura_bench_async"
REDIS_URL = "redis://127.0.0.1:6379/9"
AMQP_URL = f"amqp://guest:guest@{HOST}:5672/{VHOST}"
PG_ADMIN = f"postgresql://postgres@{HOST}:5432/test"
PG_DSN = f"postgresql://postgres@{HOST}:5432/{DATABASE}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], capture_output=True, check=False, timeout=60)


async def _setup_database() -> None:
    admin = await asyncpg.connect(PG_ADMIN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await admin.close()
    from aura.db import Database, upgrade

    database = Database(f"postgresql+asyncpg://postgres@{HOST}:5432/{DATABASE}")
    await upgrade(database)
    await database.dispose()
    sys.path.insert(0, str(ROOT))
    from bench.bench_async_tasks import RESULTS_TABLE

    connection = await asyncpg.connect(PG_DSN)
    await connection.execute(RESULTS_TABLE)
    await connection.close()


async def _drop_database() -> None:
    admin = await asyncpg.connect(PG_ADMIN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
    finally:
        await admin.close()


def _rows(run: str) -> int:
    async def count() -> int:
        connection = await asyncpg.connect(PG_DSN)
        try:
            return int(
                await connection.fetchval("SELECT count(*) FROM bench_results WHERE run = $1", run)
            )
        finally:
            await connection.close()

    return asyncio.run(count())


def _tree(pids: list[int]) -> list[int]:
    found = list(pids)
    for pid in pids:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        found += _tree([int(c) for c in children])
    return found


def _cpu_and_rss(pids: list[int]) -> tuple[float, int]:
    ticks, rss = 0, 0
    for pid in _tree(pids):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf(
                "SC_PAGESIZE"
            )
        except OSError:
            continue
    return ticks / os.sysconf("SC_CLK_TCK"), rss


class Workers:
    def __init__(self, pool: str, processes: int, concurrency: int, env: dict[str, str]) -> None:
        command = [sys.executable, "-m", "celery", "-A", "bench.bench_async_tasks", "worker"]
        command += ["-c", str(concurrency), "-Q", "realtime_queue", "--without-heartbeat"]
        command += ["--without-gossip", "--without-mingle", "-l", "WARNING"]
        if pool == "threads":
            command += ["-P", "threads"]
        worker_env = {**env, "WORKER_POOL": "async" if pool == "async" else "prefork"}
        worker_env["WORKER_CONCURRENCY"] = str(concurrency)
        self.logs = [Path(f"/tmp/bench-async-worker-{pool}-{i}.log") for i in range(processes)]
        self.processes = [
            subprocess.Popen(
                command,
                env=worker_env,
                cwd=ROOT,
                stdout=log.open("wb"),
                stderr=subprocess.STDOUT,
            )
            for log in self.logs
        ]

    def stop(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


def _round(app: Any, task: str, records: int, workers: Workers) -> dict[str, float]:
    run = uuid.uuid4().hex
    pids = [p.pid for p in workers.processes]
    cpu_before, _ = _cpu_and_rss(pids)
    started = time.monotonic()
    with app.producer_or_acquire() as producer:
        for index in range(records):
            app.send_task(task, args=[run, index], queue="realtime_queue", producer=producer)
    while (done := _rows(run)) < records:
        if time.monotonic() - started > 600:
            raise SystemExit(f"{task}: only {done} of {records} records after 600 s")
        time.sleep(0.25)
    elapsed = time.monotonic() - started
    cpu_after, rss = _cpu_and_rss(pids)
    return {
        "records_per_s": records / elapsed,
        "cpu_ms_per_record": (cpu_after - cpu_before) * 1000 / records,
        "rss_mib": rss / 2**20,
    }


def _warm(app: Any, task: str) -> None:
    run = uuid.uuid4().hex
    app.send_task(task, args=[run, 0], queue="realtime_queue")
    deadline = time.monotonic() + 120
    while _rows(run) < 1:
        if time.monotonic() > deadline:
            raise SystemExit(f"{task}: the worker never consumed")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--records", type=int, default=1500, help="per 100 in flight")
    args = parser.parse_args()

    _rabbitmqctl("delete_vhost", VHOST)
    _rabbitmqctl("add_vhost", VHOST)
    _rabbitmqctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
    asyncio.run(_setup_database())
    redis.Redis.from_url(REDIS_URL).flushdb()
    port = _free_port()
    simulator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aura",
            "llm-sim",
            "--port",
            str(port),
            "--latency",
            str(args.latency),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://{HOST}:{port}/admin/stats", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("the simulator did not start") from None
            time.sleep(0.2)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "DB_", "LLM_"))},
        "CELERY_BROKER_URL": AMQP_URL,
        "REDIS_URL": REDIS_URL,
        "DATABASE_URL": f"postgresql+asyncpg://postgres@{HOST}:5432/{DATABASE}",
        "DB_POOL_SIZE": "20",
        "DB_MAX_OVERFLOW": "10",
        "LLM_BASE_URL": f"http://{HOST}:{port}/v1",
        "LLM_READ_TIMEOUT": "30",
        "LLM_CALL_DEADLINE": "30",
        "BENCH_PG_DSN": PG_DSN,
        "PYTHONPATH": str(ROOT),
        "LOG_LEVEL": "WARNING",
    }
    from aura.config import Settings
    from aura.worker.celery_app import make_celery_app

    app = make_celery_app(Settings(celery_broker_url=AMQP_URL))
    kinds = [
        ("aura async c=100", "async", 1, 100, "bench.aura_job"),
        ("celery threads c=100", "threads", 1, 100, "bench.plain_job"),
        ("aura async c=500", "async", 2, 250, "bench.aura_job"),
    ]
    results: dict[str, dict[str, float]] = {}
    try:
        for label, pool, processes, concurrency, task in kinds:
            workers = Workers(pool, processes, concurrency, env)
            try:
                _warm(app, task)
                in_flight = processes * concurrency
                records = args.records * in_flight // 100
                result = _round(app, task, records, workers)
                result["share_of_limit"] = result["records_per_s"] / (in_flight / args.latency)
                results[label] = result
                print(
                    f"{label:22} {result['records_per_s']:8.1f} records/s "
                    f"({100 * result['share_of_limit']:5.1f} % of {in_flight}/{args.latency:g} s)"
                    f"  {result['cpu_ms_per_record']:5.2f} ms CPU/record"
                    f"  RSS {result['rss_mib']:6.1f} MiB ({processes} process(es))",
                    flush=True,
                )
            finally:
                workers.stop()
    finally:
        simulator.terminate()
        simulator.wait(10)
        _rabbitmqctl("delete_vhost", VHOST)
        asyncio.run(_drop_database())
    aura, threads = results["aura async c=100"], results["celery threads c=100"]
    print("--- ratios")
    print(
        f"aura c=100 / celery threads c=100: {aura['records_per_s'] / threads['records_per_s']:.2f}"
    )
    print(f"aura c=500: {100 * results['aura async c=500']['share_of_limit']:.1f} % of the limit")


if __name__ == "__main__":
    main()
