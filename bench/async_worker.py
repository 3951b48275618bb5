"""LLM-bound throughput of one worker node: Aura's async pool, Celery's threads pool and a
bare aio-pika consumer on the same job, in one run.

    .venv/bin/python bench/async_worker.py [--seconds 12] [--rounds 1] [--latencies 1.0,0.2]
        [--profile DIR] [--long 50000] [--burn 2]

The job: one chat completion from the LLM simulator, which answers after L seconds, and one
PostgreSQL row per record (``bench/bench_async_tasks.py``, ``bench/bare_worker.py``).

    aura c=100          one process, AsyncPool, 100 in flight, every guarantee on
                        (inbox lookup and claim, breaker, deadline, retries, DLQ)
    aura traced c=100   the same with tracing on (aura.tracing): every span exported
                        over OTLP/HTTP (batched, as deployed) to a sink here that drops it
    aura 2x50 c=100     the same 100 in flight as two processes x 50 (one per core)
    celery threads c=100  one process, Celery's threads pool, sync httpx + psycopg
    bare c=100          one process, aio-pika + aiohttp + asyncpg, no guarantee
    aura c=500          two processes x 250 in flight (this machine has 2 cores)
    bare c=500          one process, 500 in flight
    aura c=1000         two processes x 500 in flight
    bare c=1000         one process, 1,000 in flight

Every kind runs at each latency (c=500 and c=1000 kinds at the first only; ``--kinds``
picks labels, or a first or last word of them: ``aura``, ``c=100``), ``--rounds`` times,
interleaved; the median round is reported. Each round publishes ``--seconds`` x the
limit's records (in flight / L per second) and is timed from the first publish until that
many rows exist; CPU is the worker's process tree (user + system, from /proc) over the
round, divided by the records. ``--profile DIR`` records each Aura round with py-spy
(``--idle`` off, ``--nonblocking``) and prints the top self and inclusive costs.
``--burn N`` starts N CPU-burning processes (a tight Python loop at the bench's own nice
level) before each round's first publish and stops them after its last row, the same for
every kind: a controlled competing load, as on a shared node (the load average is printed
with each round, taken at its end). ``--long N`` ends with one Aura c=500 run of N records
and prints its RSS as it goes.
Everything runs on its own vhost, PostgreSQL database (``aura_bench_async``) and Redis
db 9, made here and removed at the end; the simulators run in their own processes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
PY_SPY = Path(sys.executable).parent / "py-spy"


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
    from aura.catalog import upgrade
    from aura.db import Database

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

    for _ in range(60):  # the shared server may be at max_connections for a moment
        try:
            return asyncio.run(count())
        except asyncpg.TooManyConnectionsError:
            time.sleep(1.0)
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
        if pool == "bare":
            command = [sys.executable, str(ROOT / "bench" / "bare_worker.py")]
            command += ["--concurrency", str(concurrency)]
        else:
            command = [sys.executable, "-m", "celery", "-A", "bench.bench_async_tasks", "worker"]
            command += ["-c", str(concurrency), "-Q", "realtime_queue", "--without-heartbeat"]
            command += ["--without-gossip", "--without-mingle", "-l", "WARNING"]
            if pool == "threads":
                command += ["-P", "threads"]
        worker_env = {**env, "WORKER_POOL": "async" if pool == "async" else "prefork"}
        worker_env["WORKER_CONCURRENCY"] = str(concurrency)
        self.logs = [Path(f"/tmp/bench-async-worker-{pool}-{i}.log") for i in range(processes)]
        # A node name each: two workers named celery@host on one vhost collide on their
        # exclusive pidbox queue, and the second exits at start (RESOURCE_LOCKED).
        names = [[] if pool == "bare" else ["-n", f"bench{i}@%h"] for i in range(processes)]
        self.processes = [
            subprocess.Popen(
                command + name,
                env=worker_env,
                cwd=ROOT,
                stdout=log.open("wb"),
                stderr=subprocess.STDOUT,
            )
            for log, name in zip(self.logs, names, strict=True)
        ]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def stop(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


class Burners:
    """``count`` processes that each burn a core in a tight Python loop until stopped."""

    def __init__(self, count: int) -> None:
        self.processes = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)
        ]

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.wait(10)


class Profiler:
    """py-spy on every worker process of a round; raw (collapsed) stacks, idle left out
    unless ``flags`` say ``--idle`` (then per thread, waits included)."""

    flags: tuple[str, ...] = ("--gil",)

    def __init__(self, pids: list[int], stem: Path) -> None:
        self.files = [stem.with_name(f"{stem.name}-{pid}.txt") for pid in pids]
        self.spies = [
            subprocess.Popen(
                [
                    str(PY_SPY),
                    "record",
                    "-p",
                    str(pid),
                    "--format",
                    "raw",
                    "--nonblocking",
                    *self.flags,
                    "--rate",
                    "200",
                    "-o",
                    str(file),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for pid, file in zip(pids, self.files, strict=True)
        ]

    def stop(self) -> list[Path]:
        for spy in self.spies:
            spy.send_signal(signal.SIGINT)
        for spy in self.spies:
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
        return [file for file in self.files if file.exists()]


def _frame(frame: str) -> str:
    """``function (path/to/module.py:123)`` -> ``function (module.py)``"""
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    parts = path.split("/")
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1 :]
    elif "src" in parts:
        parts = parts[parts.index("src") + 1 :]
    return f"{name} ({'/'.join(parts[-2:])})"


def print_profile(files: list[Path], top: int = 25) -> None:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for file in files:
        for line in file.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [_frame(f) for f in stack.split(";") if " (" in f]
            if not frames:
                continue
            total += count
            own[frames[-1]] += count
            for name in set(frames):
                inclusive[name] += count
    if not total:
        print("  (no samples)")
        return
    print(f"  {total} samples; self:")
    for name, count in own.most_common(top):
        print(f"    {100 * count / total:5.1f} %  {name}")
    print("  inclusive:")
    for name, count in inclusive.most_common(top + 15):
        print(f"    {100 * count / total:5.1f} %  {name}")


def _round(
    app: Any,
    task: str,
    records: int,
    workers: Workers,
    profile: Path | None = None,
    burn: int = 0,
) -> dict[str, float]:
    run = uuid.uuid4().hex
    pids = workers.pids
    burners = Burners(burn)
    try:
        return _measured(app, task, records, pids, run, profile)
    finally:
        burners.stop()


def _measured(
    app: Any, task: str, records: int, pids: list[int], run: str, profile: Path | None
) -> dict[str, float]:
    profiler = Profiler(pids, profile) if profile is not None else None
    sched_before = _sched(pids)
    cpu_before, _ = _cpu_and_rss(pids)
    started = time.monotonic()
    with app.producer_or_acquire() as producer:
        for index in range(records):
            app.send_task(task, args=[run, index], queue="realtime_queue", producer=producer)
    while (done := _rows(run)) < records:
        if time.monotonic() - started > 900:
            raise SystemExit(f"{task}: only {done} of {records} records after 900 s")
        time.sleep(0.25)
    elapsed = time.monotonic() - started
    cpu_after, rss = _cpu_and_rss(pids)
    if SHOW_SCHED:
        _print_sched(sched_before, _sched(pids), records, elapsed)
    if profiler is not None:
        print(f"profile of this round ({profile}):")
        print_profile(profiler.stop())
    return {
        "records_per_s": records / elapsed,
        "cpu_ms_per_record": (cpu_after - cpu_before) * 1000 / records,
        "rss_mib": rss / 2**20,
        "load": os.getloadavg()[0],
    }


SHOW_SCHED = False


def _sched(pids: list[int]) -> dict[int, tuple[int, ...]]:
    """Per thread of the workers: ns on a CPU, ns waiting for one (runnable), voluntary
    and involuntary context switches (/proc/PID/task/TID/schedstat and status)."""
    found: dict[int, tuple[int, ...]] = {}
    for pid in _tree(pids):
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                ran, waited, _ = (int(v) for v in (task / "schedstat").read_text().split())
                status = (task / "status").read_text().splitlines()
            except (OSError, ValueError):
                continue
            switches = [int(line.split()[1]) for line in status if "ctxt_switches" in line]
            found[int(task.name)] = (ran, waited, *switches)
    return found


def _print_sched(
    before: dict[int, tuple[int, ...]], after: dict[int, tuple[int, ...]], records: int, s: float
) -> None:
    """Threads that used >= 1 % of the round's CPU: per record, CPU and run-queue wait
    (ms), voluntary (it waited: a lock, the GIL, I/O) and involuntary (preempted) switches."""
    deltas = {
        tid: [a - b for a, b in zip(after[tid], before.get(tid, (0, 0, 0, 0)), strict=True)]
        for tid in after
    }
    total = sum(d[0] for d in deltas.values()) or 1
    for tid, (ran, waited, voluntary, involuntary) in sorted(
        deltas.items(), key=lambda i: -i[1][0]
    ):
        if ran < total / 100:
            continue
        print(
            f"    thread {tid}: {ran / 1e6 / records:.3f} ms CPU/record ({ran / 1e9 / s:.2f} core),"
            f" {waited / 1e6 / records:.3f} ms runnable-waiting/record, switches/record:"
            f" {voluntary / records:.2f} voluntary, {involuntary / records:.2f} involuntary"
        )


def _long_run(app: Any, task: str, records: int, workers: Workers, in_flight: int) -> None:
    """Publish ``records`` at a pace that keeps about ``in_flight`` x 2 queued; sample RSS."""
    run = uuid.uuid4().hex
    pids = workers.pids
    started = time.monotonic()
    published = done = 0
    next_sample = 0
    cpu_before, _ = _cpu_and_rss(pids)
    samples: list[tuple[int, float]] = []
    progress_at, last_done = time.monotonic(), 0
    with app.producer_or_acquire() as producer:
        while done < records:
            while published < records and published - done < 3 * in_flight:
                app.send_task(
                    task, args=[run, published], queue="realtime_queue", producer=producer
                )
                published += 1
            done = _rows(run)
            if done >= next_sample:
                _, rss = _cpu_and_rss(pids)
                samples.append((done, rss / 2**20))
                print(
                    f"  {done:7,d} done  {time.monotonic() - started:6.1f} s"
                    f"  RSS {rss / 2**20:6.1f} MiB ({len(pids)} process(es))",
                    flush=True,
                )
                next_sample = done + max(records // 10, 1)
            if done != last_done:
                progress_at, last_done = time.monotonic(), done
            elif time.monotonic() - progress_at > 120:  # the rest dead-lettered (or stuck)
                print(f"  no progress for 120 s at {done:,}: the rest are in the DLQ or stuck")
                break
            time.sleep(0.2)
    elapsed = time.monotonic() - started
    cpu_after, rss = _cpu_and_rss(pids)
    samples.append((done, rss / 2**20))
    print(
        f"  {done:7,d} done  {elapsed:6.1f} s  RSS {rss / 2**20:6.1f} MiB; {done / elapsed:.1f}"
        f" records/s, {(cpu_after - cpu_before) * 1000 / done:.2f} ms CPU/record"
    )
    settled = [rss for count, rss in samples if count >= records // 5]
    if settled:
        growth = 100 * (settled[-1] - settled[0]) / settled[0]
        print(
            f"  RSS from 20 % of the run to its end: {settled[0]:.1f} -> {settled[-1]:.1f} MiB "
            f"({growth:+.1f} %); per process {settled[-1] / len(pids):.1f} MiB"
        )


def _warm(app: Any, task: str) -> None:
    run = uuid.uuid4().hex
    app.send_task(task, args=[run, 0], queue="realtime_queue")
    deadline = time.monotonic() + 120
    while _rows(run) < 1:
        if time.monotonic() > deadline:
            raise SystemExit(f"{task}: the worker never consumed")
        time.sleep(0.2)


def _simulator(latency: float) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    command = [sys.executable, "-m", "aura", "llm-sim", "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--latency", str(latency)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://{HOST}:{port}/admin/stats", timeout=1)
            return process, f"http://{HOST}:{port}/v1"
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("the simulator did not start") from None
            time.sleep(0.2)


KINDS = [  # label, pool, processes, concurrency per process, task, every latency
    ("aura c=100", "async", 1, 100, "bench.aura_job", True),
    ("aura traced c=100", "async", 1, 100, "bench.aura_job", True),
    ("aura 2x50 c=100", "async", 2, 50, "bench.aura_job", True),
    ("celery threads c=100", "threads", 1, 100, "bench.plain_job", True),
    ("bare c=100", "bare", 1, 100, "bench.aura_job", True),
    ("aura c=500", "async", 2, 250, "bench.aura_job", False),
    ("bare c=500", "bare", 1, 500, "bench.aura_job", False),
    ("aura c=1000", "async", 2, 500, "bench.aura_job", False),
    ("bare c=1000", "bare", 1, 1000, "bench.aura_job", False),
]


def _kind_env(label: str, sink: str) -> dict[str, str]:
    """What a kind adds to the workers' environment: tracing on, to ``sink``, for a traced one."""
    if "traced" not in label.split():
        return {}
    return {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": sink, "OTEL_SERVICE_NAME": "bench-worker"}


def _trace_sink() -> tuple[ThreadingHTTPServer, str]:
    """An OTLP/HTTP endpoint that answers every export 200 and keeps nothing."""

    class Drop(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_: object) -> None:
            return

    server = ThreadingHTTPServer((HOST, 0), Drop)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{HOST}:{server.server_address[1]}/v1/traces"


def _wanted(label: str, words: list[str]) -> bool:
    """A kind is picked by its label, or a first or last word of it ("aura", "c=100")."""
    return not words or any(
        label == w or label.startswith(w + " ") or label.endswith(" " + w) for w in words
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latencies", default="1.0,0.2", help="seconds, comma-separated")
    parser.add_argument("--seconds", type=float, default=12.0, help="of work at the limit")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--kinds", default="", help="labels to run (substring), comma-separated")
    parser.add_argument("--profile", type=Path, help="py-spy each Aura round into this dir")
    parser.add_argument("--long", type=int, default=0, help="records of a final aura c=500 run")
    parser.add_argument("--burn", type=int, default=0, help="CPU-burning processes per round")
    parser.add_argument("--sched", action="store_true", help="per-thread CPU, waits, switches")
    parser.add_argument("--idle", action="store_true", help="--profile with --idle --threads")
    args = parser.parse_args()
    global SHOW_SCHED
    SHOW_SCHED = args.sched
    Profiler.flags = ("--idle", "--threads") if args.idle else ("--gil",)
    latencies = [float(v) for v in args.latencies.split(",")]
    wanted = [w for w in args.kinds.split(",") if w]
    kinds = [k for k in KINDS if _wanted(k[0], wanted)]
    print(f"load average at the start: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores")
    print(f"competing load: {args.burn} CPU-burning process(es) per round, nice {os.nice(0)}")

    _rabbitmqctl("delete_vhost", VHOST)
    _rabbitmqctl("add_vhost", VHOST)
    _rabbitmqctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
    asyncio.run(_setup_database())
    redis.Redis.from_url(REDIS_URL).flushdb()
    simulators = {latency: _simulator(latency) for latency in latencies}
    sink, sink_url = _trace_sink()
    base_env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CELERY_", "DB_", "LLM_", "OTEL_"))
        },
        "CELERY_BROKER_URL": AMQP_URL,
        "REDIS_URL": REDIS_URL,
        "DATABASE_URL": f"postgresql+asyncpg://postgres@{HOST}:5432/{DATABASE}",
        # 25 connections per process, kept: SQLAlchemy closes an overflow connection when
        # it comes back to a full pool, and the synchronised waves of this job (every task
        # of a wave ends its LLM call at once) made 20 + 5 overflow churn, each new asyncpg
        # connection paying its TLS attempt and type set-up (seen in py-spy).
        "DB_POOL_SIZE": "25",
        "DB_MAX_OVERFLOW": "0",
        "LLM_READ_TIMEOUT": "30",
        "LLM_CALL_DEADLINE": "30",
        "BENCH_PG_DSN": PG_DSN,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")]),  # this checkout's code
        "LOG_LEVEL": "WARNING",
    }
    from aura.config import Settings
    from aura.worker.celery_app import make_celery_app

    app = make_celery_app(Settings(celery_broker_url=AMQP_URL))
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, float], list[dict[str, float]]] = collections.defaultdict(list)
    plan = [
        (kind, latency)
        for latency in latencies
        for kind in kinds
        if kind[5] or latency == latencies[0]
    ]
    try:
        for number in range(args.rounds):
            for (label, pool, processes, concurrency, task, _), latency in plan:
                env = {**base_env, **_kind_env(label, sink_url)}
                env["LLM_BASE_URL"] = simulators[latency][1]
                workers = Workers(pool, processes, concurrency, env)
                try:
                    _warm(app, task)
                    in_flight = processes * concurrency
                    records = int(args.seconds * in_flight / latency)
                    profile = None
                    if args.profile and pool == "async":
                        name = f"{label.replace(' ', '_').replace('=', '')}-L{latency:g}-r{number}"
                        profile = args.profile / name
                    result = _round(app, task, records, workers, profile, args.burn)
                    result["share_of_limit"] = result["records_per_s"] / (in_flight / latency)
                    results[(label, latency)].append(result)
                    print(
                        f"L={latency:g} {label:21} {result['records_per_s']:7.1f} records/s "
                        f"({100 * result['share_of_limit']:5.1f} % of {in_flight}/{latency:g} s)"
                        f"  {result['cpu_ms_per_record']:5.2f} ms CPU/record"
                        f"  RSS {result['rss_mib']:6.1f} MiB ({processes} process(es))"
                        f"  load {result['load']:.1f}",
                        flush=True,
                    )
                finally:
                    workers.stop()
        if args.long:
            print(f"long run: aura c=500 (2 x 250), {args.long:,} records, L={latencies[0]:g}")
            env = {**base_env, "LLM_BASE_URL": simulators[latencies[0]][1]}
            workers = Workers("async", 2, 250, env)
            try:
                _warm(app, "bench.aura_job")
                _long_run(app, "bench.aura_job", args.long, workers, 500)
            finally:
                workers.stop()
    finally:
        for process, _ in simulators.values():
            process.terminate()
            process.wait(10)
        sink.shutdown()
        _rabbitmqctl("delete_vhost", VHOST)
        asyncio.run(_drop_database())
    _report(results, latencies)


def _report(
    results: dict[tuple[str, float], list[dict[str, float]]], latencies: list[float]
) -> None:
    def median(label: str, latency: float, key: str) -> float | None:
        rounds = results.get((label, latency))
        return statistics.median(r[key] for r in rounds) if rounds else None

    print(f"--- medians of the rounds; load average at the end {os.getloadavg()[0]:.2f}")
    for label, latency in results:
        rate = median(label, latency, "records_per_s")
        share = median(label, latency, "share_of_limit")
        cpu = median(label, latency, "cpu_ms_per_record")
        assert rate is not None
        assert share is not None
        assert cpu is not None
        print(f"L={latency:g} {label:21} {rate:7.1f} records/s {100 * share:5.1f} %  {cpu:5.2f} ms")
    print("--- ratios (records/s, same run)")
    for latency in latencies:
        for mine in ("aura c=100", "aura 2x50 c=100"):
            aura = median(mine, latency, "records_per_s")
            for other in ("celery threads c=100", "bare c=100"):
                base = median(other, latency, "records_per_s")
                if aura and base:
                    print(f"L={latency:g} {mine} / {other}: {aura / base:.2f}")
    latency = latencies[0]
    for label in ("aura c=500", "bare c=500", "aura c=1000", "bare c=1000"):
        share = median(label, latency, "share_of_limit")
        if share is not None:
            print(f"L={latency:g} {label}: {100 * share:.1f} % of the limit")
    aura500, bare500 = (
        median("aura c=500", latency, "records_per_s"),
        median("bare c=500", latency, "records_per_s"),
    )
    if aura500 and bare500:
        print(f"L={latency:g} aura c=500 / bare c=500: {aura500 / bare500:.2f}")


if __name__ == "__main__":
    main()
