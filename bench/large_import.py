"""A 100,000-record import against one `aura gateway` process: its RSS before, at peak and
after, how long the import took to be accepted (202) and to be published, and the messages
counted at the broker (every record exactly once).

    python bench/large_import.py --database-url postgresql+asyncpg://postgres@127.0.0.1/x \\
        --broker-url amqp://guest:guest@127.0.0.1:5672/vhost [--records 100000]

The body is generated as it is sent (chunked), so the client holds none of it. Needs a
database of its own (migrated here) and a vhost of its own (its work queues are purged).
Target: RSS growth under 100 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_load import free_port, prepare, rss_mib, serve


def queue_depth(broker_url: str, name: str) -> int:
    from kombu.connection import Connection

    from aura.contract import PLATFORM_QUEUES
    from aura.messaging.topology import work_queues

    with Connection(broker_url) as connection:
        channel = connection.channel()
        queue = next(q for q in work_queues(PLATFORM_QUEUES) if q.name == name)(channel)
        queue.declare()
        _, count, _ = queue.queue_declare(passive=True)
        return int(count)


def outbox_left(database_url: str) -> int:
    import asyncpg

    async def count() -> int:
        dsn = database_url.replace("postgresql+asyncpg://", "postgresql://")
        connection = await asyncpg.connect(dsn)
        try:
            return int(await connection.fetchval("SELECT count(*) FROM outbox"))
        finally:
            await connection.close()

    return asyncio.run(count())


def purge(broker_url: str) -> None:
    from kombu.connection import Connection

    from aura.contract import PLATFORM_QUEUES
    from aura.messaging.topology import work_queues

    with Connection(broker_url) as connection:
        channel = connection.channel()
        for queue in work_queues(PLATFORM_QUEUES):
            bound = queue(channel)
            bound.declare()
            bound.purge()


async def body(records: int) -> AsyncIterator[bytes]:
    lines = []
    for i in range(records):
        lines.append(
            json.dumps(
                {
                    "title": f"Trail shoe {i}",
                    "brand": "Aura",
                    "variants": [{"sku": f"BIG-{i}", "price": "59.90"}],
                }
            )
        )
        if len(lines) == 1000:
            yield ("\n".join(lines) + "\n").encode()
            lines = []
    if lines:
        yield ("\n".join(lines) + "\n").encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--broker-url", required=True)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--records", type=int, default=100_000)
    options = parser.parse_args()
    purge(options.broker_url)
    tenant_id, key = asyncio.run(prepare(options.database_url))
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "LANG", "TMPDIR"}}
    env = {
        **base,
        "DATABASE_URL": options.database_url,
        "CELERY_BROKER_URL": options.broker_url,
        "REDIS_URL": options.redis_url,
        "LOG_LEVEL": "WARNING",
        "DB_POOL_SIZE": "5",
    }
    gateway = serve([sys.executable, "-m", "aura", "gateway", "--port", str(port)], env, port)
    try:
        start_rss = rss_mib(gateway.pid)
        peak = [start_rss]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mib(gateway.pid))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/tenants/{tenant_id}/imports",
            content=_sync(body(options.records)),
            headers={"X-API-Key": key, "content-type": "application/x-ndjson"},
            timeout=600,
        )
        accepted_after = time.monotonic() - started
        assert response.status_code == 202, response.text
        print(f"  accepted after {accepted_after:.1f} s; RSS peak so far {peak[0]:.0f} MiB")
        deadline = time.monotonic() + 600
        while (depth := queue_depth(options.broker_url, "bulk_queue")) < options.records:
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        published_after = time.monotonic() - started
        while outbox_left(options.database_url) and time.monotonic() < deadline:
            time.sleep(0.5)  # sent; each row is deleted once the broker confirmed it
        left = outbox_left(options.database_url)
        depth = queue_depth(options.broker_url, "bulk_queue")  # duplicates would show here
        stop.set()
        sampler.join()
        end_rss = rss_mib(gateway.pid)
    finally:
        gateway.terminate()
        gateway.wait(60)
    print(f"{options.records} records as JSON lines, one `aura gateway` process")
    print(f"  accepted (202) after {accepted_after:.1f} s: {response.json()}")
    print(
        f"  in bulk_queue at the broker: {depth} after {published_after:.1f} s "
        f"(exactly {options.records}: none twice); left in the outbox: {left}"
    )
    print(
        f"  RSS {start_rss:.0f} MiB -> peak {peak[0]:.0f} MiB -> {end_rss:.0f} MiB after; "
        f"growth {peak[0] - start_rss:.0f} MiB (target < 100)"
    )
    purge(options.broker_url)


def _sync(stream: AsyncIterator[bytes]) -> object:
    """The async generator as a plain iterator (httpx's sync client streams it)."""
    loop = asyncio.new_event_loop()

    def chunks() -> object:
        try:
            while True:
                try:
                    yield loop.run_until_complete(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            loop.close()

    return chunks()


if __name__ == "__main__":
    main()
