"""Throughput of a no-op ``resilient_task`` against a plain Celery task, same run.

    .venv/bin/python bench/task_overhead.py [--messages N] [--rounds R]

One prefork worker (concurrency 2) with the same settings serves both tasks on the same
broker (its own vhost, made and removed here); each round publishes N messages of one
kind and times how long the worker takes to finish them (each task does one Redis INCR,
so completion can be counted). Rounds alternate kinds; the best round of each counts.
Target (DESIGN.md): resilient >= 0.95 x plain.
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


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


def run_round(app: object, client: redis.Redis, task: str, messages: int) -> float:
    key = f"bench:{uuid.uuid4().hex}"
    started = time.perf_counter()
    for _ in range(messages):
        app.send_task(task, args=[key], queue="realtime_queue")  # type: ignore[attr-defined]
    deadline = time.monotonic() + 600
    while int(client.get(key) or 0) < messages:
        if time.monotonic() > deadline:
            raise SystemExit(f"{task}: not finished within 600 s")
        time.sleep(0.02)
    return messages / (time.perf_counter() - started)


def main(messages: int, rounds: int, redis_url: str) -> None:
    rabbitmqctl("add_vhost", VHOST)
    rabbitmqctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
    broker = f"amqp://guest:guest@127.0.0.1:5672/{VHOST}"
    env = {
        **os.environ,
        "CELERY_BROKER_URL": broker,
        "REDIS_URL": redis_url,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")]),  # this checkout's code
    }
    worker = start_worker_process("bench.bench_tasks", env, queues=["realtime_queue"], cwd=ROOT)
    client = redis.Redis.from_url(redis_url)
    try:
        app = make_celery_app(Settings(celery_broker_url=broker))
        run_round(app, client, "bench.plain", 50)  # warm-up: the worker is consuming
        results: dict[str, list[float]] = {
            "bench.plain": [],
            "bench.resilient": [],
            "bench.resilient_async": [],
        }
        for _ in range(rounds):
            for task in results:
                results[task].append(run_round(app, client, task, messages))
    finally:
        stop_worker_process(worker)
        rabbitmqctl("delete_vhost", VHOST)
        client.close()

    best = {task: max(rates) for task, rates in results.items()}
    print(f"messages per round: {messages:,}; rounds: {rounds}; prefork concurrency 2")
    for task, rates in results.items():
        shown = ", ".join(f"{rate:,.0f}" for rate in rates)
        print(f"{task:<24} best {best[task]:8,.0f} msg/s   (rounds: {shown})")
    plain = best["bench.plain"]
    ratio_sync = best["bench.resilient"] / plain
    ratio_async = best["bench.resilient_async"] / plain
    print("--- ratios")
    print(f"resilient_task (def) / plain:       {ratio_sync:.3f}")
    print(f"resilient_task (async def) / plain: {ratio_async:.3f}")
    met = "MET" if ratio_sync >= 0.95 else "NOT MET"
    print(f"target resilient >= 0.95 x plain: {ratio_sync:.3f}, {met}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    args = parser.parse_args()
    main(args.messages, args.rounds, args.redis_url)
