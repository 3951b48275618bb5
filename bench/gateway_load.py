"""Load held: locust (headless) against one `aura gateway` process, then against two bare
FastAPI + asyncpg endpoints (bench/bare_gateway.py), in one run: ``app`` doing the same
insert and nothing else, and ``publishing_app``, the honest peer, doing the insert plus an
outbox row in the same transaction, then one persistent message published with publisher
confirms (aio-pika) and the row deleted after the confirm.

    python bench/gateway_load.py --database-url postgresql://postgres@127.0.0.1/x \
        --broker-url amqp://guest:guest@127.0.0.1:5672/vhost [--users 200 --seconds 60]

Prints, for each: requests, those served (2xx) per second, p50/p99 over all answers (ms),
errors by status (503: shed), the peak RSS and the server process's CPU (cores busy on
average, and ms per answer); then the ratios of served throughput,
gateway / bare and gateway / bare + publish (target >= 0.8 for the latter, no errors but
503). With ``--hostile`` the gateway's load runs a second time beside
``bench/hostile_clients.py`` (a bad-key flood, slow uploads, idle half-sent requests): the
valid tenant's throughput and p99 with and without it (target >= 0.8x).

The gateway's users post a five-record import for every four products
(bench/locustfile.py); an import's messages are held for the fair dispatcher
(``aura.gateway.dispatch``), not published by its request. The bare endpoints have no
imports: their users post a product instead. ``--products-only`` gives the gateway that
same load, every request a product post published by its request.
The database must exist (it is migrated here); the vhost's work queues are purged after.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def prepare(database_url: str) -> tuple[str, str, str, str]:
    """Two tenants: the load's, and the one whose uploads the hostile mix trickles."""
    from aura.catalog import upgrade
    from aura.db import Database
    from aura.gateway import create_tenant_with_key

    database = Database(database_url)
    await upgrade(database)
    async with database.session() as session:
        tenant, key = await create_tenant_with_key(session, f"load-{uuid.uuid4().hex[:8]}")
        slow, slow_key = await create_tenant_with_key(session, f"slow-{uuid.uuid4().hex[:8]}")
        await session.commit()
    await database.dispose()
    return str(tenant.id), key, str(slow.id), slow_key


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """The process's CPU time so far, user + system (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(command: list[str], env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    # Its log goes to a file: a pipe no one reads fills up and stops the server.
    log = tempfile.NamedTemporaryFile(prefix="gateway-load-", suffix=".log", delete=False)  # noqa: SIM115
    print(f"  {command[2:4]} logs to {log.name}")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{command[2:4]} did not start: {Path(log.name).read_text()[-2000:]}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=1)
            return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("server did not answer within 60 s")


def load(
    name: str, port: int, env: dict[str, str], users: int, seconds: int, pid: int
) -> dict[str, object]:
    out = Path(tempfile.mkdtemp(prefix=f"load-{name}-"))
    command = [sys.executable, "-m", "locust", "-f", str(ROOT / "bench" / "locustfile.py")]
    command += ["--headless", "-u", str(users), "-r", str(max(users // 5, 1))]
    command += ["-t", f"{seconds}s", "--host", f"http://127.0.0.1:{port}"]
    command += ["--csv", str(out / "run"), "--only-summary", "--loglevel", "ERROR"]
    runner = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    peak = rss_mib(pid)
    start_rss = peak
    start_cpu = cpu_seconds(pid)
    while runner.poll() is None:
        peak = max(peak, rss_mib(pid))
        time.sleep(0.5)
    cpu = cpu_seconds(pid) - start_cpu
    with (out / "run_stats.csv").open() as f:
        total = next(row for row in csv.DictReader(f) if row["Name"] == "Aggregated")
    statuses: Counter[str] = Counter()
    with (out / "run_failures.csv").open() as f:
        for row in csv.DictReader(f):
            code = re.search(r"(\d{3})", row["Error"])
            statuses[code.group(1) if code else row["Error"][:60]] += int(row["Occurrences"])
    served = int(total["Request Count"]) - sum(statuses.values())
    return {
        "name": name,
        "requests": int(total["Request Count"]),
        "served": served,
        "rps": served / seconds,  # answered 2xx, per second of the run
        "p50": total["50%"],
        "p99": total["99%"],
        "errors": dict(statuses),
        "rss_start": start_rss,
        "rss_peak": peak,
        "cpu": cpu / seconds,  # the server's cores busy, on average
        "cpu_ms": 1000 * cpu / max(int(total["Request Count"]), 1),  # per answer
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--broker-url", required=True)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument(
        "--hostile",
        action="store_true",
        help="also run the gateway's load beside a hostile mix (bench/hostile_clients.py)",
    )
    parser.add_argument(
        "--products-only",
        action="store_true",
        help="give the gateway the bare endpoints' load (product posts only, no imports)",
    )
    options = parser.parse_args()
    tenant_id, key, slow_id, slow_key = asyncio.run(prepare(options.database_url))
    base = {
        k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "LANG", "TMPDIR", "PYTHONPATH"}
    }
    users_env = {**base, "AURA_TENANT_ID": tenant_id, "AURA_API_KEY": key}
    # The bare endpoints have no imports: their users post a product instead (AURA_BARE).
    gateway_users = {**users_env, "AURA_BARE": "1"} if options.products_only else users_env
    results = []

    port = free_port()
    gateway_env = {
        **base,
        "DATABASE_URL": options.database_url,
        "CELERY_BROKER_URL": options.broker_url,
        "REDIS_URL": options.redis_url,
        "LOG_LEVEL": "ERROR",
        # 50 database connections, kept open, as the bare endpoint's asyncpg pool
        # (PostgreSQL allows 100 by default, and the machine is shared). Not 40 + 10
        # overflow: SQLAlchemy closes an overflow connection when it comes back to a full
        # pool, and each new asyncpg connection costs its type-codec introspection
        # queries; under this load that churn cost the gateway a third of its throughput.
        "DB_POOL_SIZE": "50",
        "DB_MAX_OVERFLOW": "0",
    }
    gateway = serve(
        [sys.executable, "-m", "aura", "gateway", "--port", str(port)], gateway_env, port
    )
    try:
        results.append(
            load("aura gateway", port, gateway_users, options.users, options.seconds, gateway.pid)
        )
        if options.hostile:
            hostile = subprocess.Popen(
                [
                    sys.executable, str(ROOT / "bench" / "hostile_clients.py"),
                    "--port", str(port), "--tenant", tenant_id, "--slow-tenant", slow_id,
                    "--slow-key", slow_key, "--seconds", str(options.seconds + 5),
                ],
                env=base,
            )  # fmt: skip
            time.sleep(3)  # the mix is on before the load starts
            try:
                results.append(
                    load(
                        "aura gateway + hostile",
                        port,
                        gateway_users,
                        options.users,
                        options.seconds,
                        gateway.pid,
                    )
                )
            finally:
                hostile.wait(60)
    finally:
        gateway.terminate()
        gateway.wait(30)

    from aura.gateway.senders import broker_urls

    dsn = re.sub(r"^postgres(ql)?(\+asyncpg)?://", "postgresql://", options.database_url)
    bare_env = {**base, "BARE_DSN": dsn, "PYTHONPATH": str(ROOT)}
    for name, target, env in [
        ("bare FastAPI+asyncpg", "app", bare_env),
        (
            "bare + outbox + publish",
            "publishing_app",
            {**bare_env, "BARE_BROKER": broker_urls(options.broker_url)[0]},
        ),
    ]:
        port = free_port()
        command = [sys.executable, "-m", "uvicorn", f"bench.bare_gateway:{target}"]
        bare = serve([*command, "--port", str(port), "--log-level", "error"], env, port)
        try:
            results.append(
                load(
                    name,
                    port,
                    {**users_env, "AURA_BARE": "1"},
                    options.users,
                    options.seconds,
                    bare.pid,
                )
            )
        finally:
            bare.terminate()
            bare.wait(30)

    print(f"{options.users} users, {options.seconds} s each, one server process each")
    for r in results:
        print(
            f"  {r['name']:<24} {r['requests']:>7} requests, {r['served']} served "
            f"({r['rps']:.1f}/s)  "
            f"p50 {r['p50']} ms  p99 {r['p99']} ms  errors {r['errors']}  "
            f"RSS {r['rss_start']:.0f} -> peak {r['rss_peak']:.0f} MiB  "
            f"server CPU {r['cpu']:.2f} cores, {r['cpu_ms']:.2f} ms per answer"
        )
    rps = {str(r["name"]): float(r["rps"]) for r in results}  # type: ignore[arg-type]
    gateway_rps = rps["aura gateway"]
    print(
        f"  throughput ratio gateway / bare: {gateway_rps / rps['bare FastAPI+asyncpg']:.2f}"
        f"  gateway / bare + publish: {gateway_rps / rps['bare + outbox + publish']:.2f}"
        " (target >= 0.8)"
    )
    if options.hostile:
        hostile_rps = rps["aura gateway + hostile"]
        print(
            f"  throughput ratio with the hostile mix / without: "
            f"{hostile_rps / gateway_rps:.2f} (target >= 0.8)"
        )

    from kombu.connection import Connection

    from aura.contract import PLATFORM_QUEUES
    from aura.messaging.topology import work_queues

    with Connection(options.broker_url) as connection:
        channel = connection.channel()
        for queue in work_queues(PLATFORM_QUEUES):
            bound = queue(channel)
            bound.declare()
            bound.purge()


if __name__ == "__main__":
    main()
