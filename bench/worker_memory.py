"""Memory of a real worker's pool processes over 20,000 tasks: flat, or growing?

    .venv/bin/python bench/worker_memory.py [--tasks N] [--every K]

One prefork worker (concurrency 2, CELERY_WORKER_MAX_TASKS_PER_CHILD=100000 so no child
is replaced during the run) serves ``bench.resilient_async`` (bench/bench_tasks.py: an
``async def`` ``resilient_task`` whose only work is one Redis INCR, so completion can be
counted) on its own vhost (made and removed here; Redis db 13). Messages are published K
at a time; once the worker has finished each batch, the VmRSS and RssAnon of its pool
children are read from /proc/PID/status (children from /proc/PID/task/*/children; the same
two pids must last the whole run). A second worker then does the same with
``bench.plain`` (the same body as a plain Celery task), the baseline.

Target (DESIGN.md): flat. Criterion: the pool's VmRSS (both children, summed) grows by
less than 5 % between the sample after 4,000 tasks (warm: every code path has run, every
pool and cache has been filled) and the last sample.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
import uuid
from pathlib import Path

import redis

from aura.config import Settings
from aura.worker.celery_app import make_celery_app
from aura.worker.process import start_worker_process, stop_worker_process

ROOT = Path(__file__).resolve().parent.parent
VHOST = "aura_bench"
WARM = 4000
LIMIT = 5.0  # percent
KINDS = ("bench.resilient_async", "bench.plain")


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return sorted(found)


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and RssAnon of ``pid``, in KiB."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon"):
            fields[name] = int(value.split()[0])
    return fields


def wait_for(client: redis.Redis, key: str, count: int, what: str) -> None:
    deadline = time.monotonic() + 600
    while int(client.get(key) or 0) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: {count} tasks not finished within 600 s")
        time.sleep(0.02)


def measure(
    kind: str, tasks: int, every: int, broker: str, redis_url: str, client: redis.Redis
) -> tuple[list[tuple[int, list[int], list[dict[str, int]], dict[str, int]]], float]:
    """Samples of (tasks done, child pids, their memory, the main process's memory)."""
    env = {
        **os.environ,
        "CELERY_BROKER_URL": broker,
        "REDIS_URL": redis_url,
        "CELERY_WORKER_MAX_TASKS_PER_CHILD": "100000",
        "PYTHONPATH": str(ROOT),
    }
    worker = start_worker_process("bench.bench_tasks", env, queues=["realtime_queue"], cwd=ROOT)
    app = make_celery_app(Settings(celery_broker_url=broker))
    key = f"bench:memory:{uuid.uuid4().hex}"
    samples = []
    try:
        app.send_task("bench.plain", args=[key + ":ready"], queue="realtime_queue")
        wait_for(client, key + ":ready", 1, kind)  # the worker is up and consuming

        def sample(done: int) -> None:
            pids = children(worker.pid)
            samples.append((done, pids, [memory_kib(p) for p in pids], memory_kib(worker.pid)))

        sample(0)
        started = time.perf_counter()
        for done in range(every, tasks + 1, every):
            for _ in range(every):
                app.send_task(kind, args=[key], queue="realtime_queue")
            wait_for(client, key, done, kind)
            time.sleep(0.2)  # let the last acks and the children settle
            sample(done)
        elapsed = time.perf_counter() - started
    finally:
        stop_worker_process(worker)
    return samples, elapsed


def growth(samples: list[tuple], field: str, start: int) -> tuple[int, int, float]:
    at = {done: sum(m[field] for m in memories) for done, _, memories, _ in samples}
    first, last = at[start], at[samples[-1][0]]
    return first, last, (last - first) / first * 100


def main(tasks: int, every: int, redis_url: str) -> None:
    if tasks < WARM + every or WARM % every:
        raise SystemExit(f"--tasks must reach past {WARM:,} and {WARM:,} be a multiple of --every")
    rabbitmqctl("add_vhost", VHOST)
    rabbitmqctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
    broker = f"amqp://guest:guest@127.0.0.1:5672/{VHOST}"
    client = redis.Redis.from_url(redis_url)
    keys_before = set(client.scan_iter())
    results = {}
    try:
        for kind in KINDS:
            results[kind] = measure(kind, tasks, every, broker, redis_url, client)
    finally:
        rabbitmqctl("delete_vhost", VHOST)
        created = [key for key in client.scan_iter() if key not in keys_before]
        if created:
            client.delete(*created)
        client.close()

    print(f"tasks: {tasks:,}, sampled every {every:,}; prefork concurrency 2, no child replaced")
    verdicts: dict[str, tuple[float, float, bool]] = {}
    for kind, (samples, elapsed) in results.items():
        pids = samples[0][1]
        stable = all(s[1] == pids for s in samples) and len(pids) == 2
        print(
            f"{kind}: {tasks / elapsed:,.0f} tasks/s; children {pids}"
            f"{'' if stable else ' -- CHANGED during the run: ' + str(samples[-1][1])}"
        )
        print(
            f"  {'tasks':>7}  {'child VmRSS (KiB)':>20}  {'pool VmRSS':>10}  {'pool RssAnon':>12}"
            f"  {'main VmRSS':>10}"
        )
        for done, _, memories, main_memory in samples:
            per_child = " ".join(f"{m['VmRSS']:>9,}" for m in memories)
            print(
                f"  {done:>7,}  {per_child:>20}  {sum(m['VmRSS'] for m in memories):>10,}"
                f"  {sum(m['RssAnon'] for m in memories):>12,}  {main_memory['VmRSS']:>10,}"
            )
        first, last, percent = growth(samples, "VmRSS", WARM)
        _, _, anon = growth(samples, "RssAnon", WARM)
        print(
            f"  pool VmRSS {first:,} KiB after {WARM:,} tasks -> {last:,} KiB after"
            f" {samples[-1][0]:,}: {percent:+.2f} % (RssAnon {anon:+.2f} %)"
        )
        main_first = next(m for done, _, _, m in samples if done == WARM)["VmRSS"]
        main_last = samples[-1][3]["VmRSS"]
        print(
            f"  main process (not in the target) VmRSS {main_first:,} -> {main_last:,} KiB:"
            f" {(main_last - main_first) / main_first * 100:+.2f} %"
        )
        verdicts[kind] = (percent, anon, stable)

    resilient, plain = results[KINDS[0]][0][-1], results[KINDS[1]][0][-1]
    size_ratio = sum(m["VmRSS"] for m in resilient[2]) / sum(m["VmRSS"] for m in plain[2])
    print("--- ratios")
    for kind, (percent, _, _) in verdicts.items():
        print(f"pool VmRSS growth {WARM:,} -> {tasks:,} tasks, {kind + ':':<22} {percent:+.2f} %")
    print(f"pool VmRSS at the end, resilient_async / plain:  {size_ratio:.3f}")
    percent, _, stable = verdicts[KINDS[0]]
    met = "MET" if stable and percent < LIMIT else "NOT MET"
    print(
        f"target flat (pool VmRSS growth < {LIMIT:g} % from {WARM:,} to {tasks:,} tasks,"
        f" resilient_async): {percent:+.2f} %, {met}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--every", type=int, default=2_000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    args = parser.parse_args()
    main(args.tasks, args.every, args.redis_url)
