"""The DLQ store against the design it replaced, in one run.

    .venv/bin/python bench/dlq_store.py [--sizes 10000,1000000] [--letters 2000]

A PostgreSQL database and a RabbitMQ vhost of the bench's own (made and dropped here).

1. Reads at N letters (10,000 and 1,000,000): ``aura dlq ls``'s first page (50), a
   filtered page (reason and tenant), a filtered count and the count by reason, each the
   best of 5 (wall time), and this process's peak RSS growth. The store is filled with
   SQL (``generate_series``) so a million rows take seconds; the rows are what the filer
   writes. The design it replaced (browse the broker queue, ``HEAD~`` of
   ``messaging/dlq.py`` before this change, loaded from git) at 10,000 letters only: it
   could not read past 100,000 (its scan bound), and every read raised each letter's
   delivery count.
2. Dead-lettering throughput (letters/s): ``publish_dead_letter`` with confirms (the
   worker's side, unchanged), and filing them into the store (committed, then acked),
   against the broker alone.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from kombu.connection import Connection

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from aura.events import DeadLetterReason  # noqa: E402
from aura.messaging.dlq import DeadLetter, DeadLetterQueue, publish_dead_letter  # noqa: E402
from aura.messaging.topology import dead_letter_queue  # noqa: E402
from tests import services  # noqa: E402

ADMIN = os.environ.get("AURA_TEST_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REASONS = [r.value for r in DeadLetterReason]


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def best(fn: Callable[[], Any], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


async def fill(url: str, source: str, n: int) -> None:
    """``n`` letters of ``source`` as the filer writes them, by SQL."""
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        await connection.execute(
            f"""
            INSERT INTO aura_dead_letters (letter_id, source, fate_id, message_id, reason,
              fingerprint, status, replay_count, kind, task, queue, tenant_id, retries,
              error_type, error, refusal, dead_lettered_at, filed_at, record, body,
              body_size, properties)
            SELECT md5(g::text || $1), $1, 'm-' || g, 'm-' || g,
              (ARRAY{REASONS!r})[1 + g % {len(REASONS)}], '', 'dead', 0, 'aura',
              'bench.task', 'bench_queue', 'tenant-' || (g % 100), 0, 'KeyError',
              'a reason', '', now() - (g || ' seconds')::interval, now(),
              json_build_object('id', md5(g::text || $1), 'message_id', 'm-' || g,
                'reason', (ARRAY{REASONS!r})[1 + g % {len(REASONS)}], 'task', 'bench.task',
                'queue', 'bench_queue', 'task_args', json_build_array('a review'),
                'task_kwargs', '{{}}'::json, 'error_type', 'KeyError', 'error', 'a reason',
                'retries', 0, 'first_failure_at', now(), 'last_failure_at', now(),
                'tenant_id', 'tenant-' || (g % 100), 'dead_lettered_at', now()),
              convert_to('{{}}', 'UTF8'), 2, '{{}}'::json
            FROM generate_series(1, $2) AS g
            """,
            source,
            n,
        )
        await connection.execute("ANALYZE aura_dead_letters")
    finally:
        await connection.close()


def old_reader() -> Any:
    """``messaging/dlq.py`` as it was before the store (git), as a module."""
    text = subprocess.run(
        ["git", "show", "6ba045c:src/aura/messaging/dlq.py"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "old_dlq.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("old_dlq", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_dlq"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def letter(n: int) -> DeadLetter:
    now = datetime.now(UTC)
    return DeadLetter(
        message_id=f"p-{n}", reason=DeadLetterReason.POISON_PILL, task="bench.task",
        queue="bench_queue", task_args=["a review"], first_failure_at=now,
        last_failure_at=now, tenant_id=f"tenant-{n % 100}",
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--letters", type=int, default=2000)
    options = parser.parse_args()
    token = uuid.uuid4().hex[:8]
    database = f"aura_bench_dlq_{token}"
    vhost = f"aura_bench_dlq_{token}"
    base = ADMIN.split("://", 1)[1].rsplit("/", 1)[0]
    url = f"postgresql+asyncpg://{base}/{database}"

    async def admin(statement: str) -> None:
        connection = await asyncpg.connect(ADMIN)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(admin(f'CREATE DATABASE "{database}"'))
    services.rabbitmqctl("add_vhost", vhost)
    services.rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    broker = f"amqp://guest:guest@{services.AMQP_HOST}/{vhost}"
    rows: list[tuple[str, ...]] = []
    try:
        with Connection(broker, transport_options={"confirm_publish": True}) as connection:
            dead_letter_queue()(connection.default_channel).declare()
            for size in [int(s) for s in options.sizes.split(",")]:
                source = f"bench-{size}"
                dlq = DeadLetterQueue(connection, url, source=source)
                dlq.list(limit=1)  # the tables
                started = time.perf_counter()
                asyncio.run(fill(url, source, size))
                fill_s = time.perf_counter() - started
                rss_before = rss_mib()
                first = best(lambda dlq=dlq: dlq.list(limit=50))
                page = best(lambda dlq=dlq: dlq.list(reason="poison_pill", tenant="tenant-7"))
                count = best(lambda dlq=dlq: dlq.count(reason="poison_pill", tenant="tenant-7"))
                by_reason = best(lambda dlq=dlq: dlq.count_by_reason())
                rows.append((
                    f"store, {size:,} letters", f"{first * 1000:.0f} ms", f"{page * 1000:.0f} ms",
                    f"{count * 1000:.0f} ms", f"{by_reason * 1000:.0f} ms",
                    f"+{rss_mib() - rss_before:.0f} MiB", f"filled in {fill_s:.1f} s",
                ))  # fmt: skip
                if size <= 10_000:
                    rows.append(old_design(connection, size))
            rows.append(throughput(connection, url, options.letters))
    finally:
        services.rabbitmqctl("delete_vhost", vhost)
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
    print("| design, size | ls first page | filtered page | filtered count | by reason | RSS | |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def old_design(connection: Connection, size: int) -> tuple[str, ...]:
    """The broker-browsing reader at ``size`` letters (it holds each unacked, then the
    channel's close puts them back: each read raises every letter's delivery count)."""
    old = old_reader()
    for n in range(size):
        old.publish_dead_letter(connection, letter(n))
    reader = old.DeadLetterQueue(connection)
    rss_before = rss_mib()
    first = best(lambda: reader.list(limit=50, scan=size), repeats=2)
    page = best(lambda: reader.list(reason="poison_pill", tenant="tenant-7", scan=size), 2)
    by_reason = best(lambda: reader.count_by_reason(scan=size), repeats=2)
    with connection.channel() as channel:
        raw = channel.basic_get(queue="aura.dlq", no_ack=False)
        count_after = (raw.headers or {}).get("x-delivery-count")
    dead_letter_queue()(connection.default_channel).purge()
    return (
        f"broker browse (before), {size:,} letters", f"{first * 1000:.0f} ms",
        f"{page * 1000:.0f} ms", "(as by reason)", f"{by_reason * 1000:.0f} ms",
        f"+{rss_mib() - rss_before:.0f} MiB",
        f"x-delivery-count after 6 reads: {count_after}",
    )  # fmt: skip


def throughput(connection: Connection, url: str, n: int) -> tuple[str, ...]:
    started = time.perf_counter()
    for i in range(n):
        publish_dead_letter(connection, letter(i))
    published = time.perf_counter() - started
    dlq = DeadLetterQueue(connection, url, source="bench-throughput")
    started = time.perf_counter()
    filed = dlq.file()
    filing = time.perf_counter() - started
    assert filed == n, filed
    return (
        f"dead-lettering {n:,} letters", f"publish+confirm {n / published:,.0f}/s",
        f"filing {n / filing:,.0f}/s", f"both {n / (published + filing):,.0f}/s",
        "(before: publish+confirm only)", "", "",
    )  # fmt: skip


if __name__ == "__main__":
    main()
