"""The bare baseline of bench/async_worker.py: aio-pika + aiohttp + asyncpg, no guarantees.

    python bench/bare_worker.py --concurrency 100

Consumes the same Celery messages from ``realtime_queue`` (prefetch = concurrency, a task
per delivery, as aio-pika does), and per message does the same job as ``bench.aura_job``
and ``bench.plain_job``: one chat completion from ``LLM_BASE_URL`` over one aiohttp
session, one ``INSERT`` into ``bench_results`` over an asyncpg pool of 20, then the ack.
No inbox, no breaker, no deadline, no retry, no DLQ: what the practical limit of "one LLM
call + one row per message" is on this machine. Environment: ``CELERY_BROKER_URL``,
``LLM_BASE_URL``, ``BENCH_PG_DSN``. SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal

import aio_pika
import aiohttp
import asyncpg

from aura.contract import PLATFORM_QUEUES, REALTIME_QUEUE
from aura.messaging.topology import WORK_EXCHANGE, work_queues


async def serve(concurrency: int) -> None:
    connection = await aio_pika.connect_robust(os.environ["CELERY_BROKER_URL"])
    pool = await asyncpg.create_pool(os.environ["BENCH_PG_DSN"], min_size=20, max_size=20)
    http = aiohttp.ClientSession(
        base_url=os.environ["LLM_BASE_URL"].rstrip("/") + "/",
        connector=aiohttp.TCPConnector(limit=concurrency),
        timeout=aiohttp.ClientTimeout(total=30),
    )
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=concurrency)
    declared = next(q for q in work_queues(PLATFORM_QUEUES) if q.name == REALTIME_QUEUE)
    exchange = await channel.declare_exchange(
        WORK_EXCHANGE.name, aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(
        REALTIME_QUEUE, durable=True, arguments=declared.queue_arguments
    )
    await queue.bind(exchange, routing_key=REALTIME_QUEUE)

    async def handle(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        (run, index), _, _ = json.loads(message.body)
        body = {"model": "sim", "messages": [{"role": "user", "content": f"item {index}"}]}
        async with http.post("chat/completions", json=body) as answer:
            answer.raise_for_status()
            await answer.json()
        await pool.execute(
            "INSERT INTO bench_results (message_id, run) VALUES ($1, $2)",
            message.headers["id"],
            run,
        )
        await message.ack()

    await queue.consume(handle)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await connection.close()
    await http.close()
    await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=100)
    asyncio.run(serve(parser.parse_args().concurrency))


if __name__ == "__main__":
    main()
