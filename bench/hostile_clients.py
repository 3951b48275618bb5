"""A hostile mix against a gateway, for ``bench/gateway_load.py --hostile``: keep-alive
connections sending random keys as fast as they are answered, connections trickling an
import's body at 1 byte/s, and connections that send half a request's headers and wait.

    python bench/hostile_clients.py --port P --tenant ID --slow-tenant ID2 --slow-key KEY2 \
        --seconds 60 [--flood 200 --slow 70 --idle 1000]

Prints what the gateway answered them (status: count) and how many it closed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from collections import Counter


async def flood(port: int, path: str, stop: asyncio.Event, answers: Counter[str]) -> None:
    """Random keys on a keep-alive connection, as fast as they are answered; when the
    gateway closes it, connect again."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            answers["refused"] += 1
            await asyncio.sleep(0.1)
            continue
        try:
            while not stop.is_set():
                key = "aura_" + uuid.uuid4().hex
                request = f"GET {path} HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\n\r\n"
                writer.write(request.encode())
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                answers[head.split(b" ", 2)[1].decode()] += 1
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                await reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError):
            answers["closed"] += 1
        finally:
            writer.close()


async def slow(port: int, path: str, key: str, stop: asyncio.Event, answers: Counter[str]) -> None:
    body = json.dumps([{"title": f"slow {n}"} for n in range(50)]).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head)
            for byte in range(len(body)):
                if stop.is_set() or reader.at_eof():
                    break
                writer.write(body[byte : byte + 1])
                await writer.drain()
                await asyncio.sleep(1.0)
            answer = await asyncio.wait_for(reader.read(64), 1.0)
            answers[answer.split(b" ", 2)[1].decode() if answer else "closed"] += 1
            writer.close()
        except (OSError, TimeoutError, IndexError):
            answers["closed"] += 1


async def idle(port: int, stop: asyncio.Event, answers: Counter[str]) -> None:
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")  # never the blank line
            answer = await reader.read(64)
            answers[answer.split(b" ", 2)[1].decode() if answer else "closed"] += 1
            writer.close()
        except (OSError, IndexError):
            answers["closed"] += 1
            await asyncio.sleep(0.5)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tenant", required=True, help="the tenant the flood claims")
    parser.add_argument("--slow-tenant", required=True, help="a tenant whose key uploads slowly")
    parser.add_argument("--slow-key", required=True)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--flood", type=int, default=200)
    parser.add_argument("--slow", type=int, default=70)
    parser.add_argument("--idle", type=int, default=1000)
    options = parser.parse_args()
    path = f"/v1/tenants/{options.tenant}/products?limit=5"
    stop = asyncio.Event()
    kinds = {name: Counter[str]() for name in ("flood", "slow", "idle")}
    tasks = [
        *(flood(options.port, path, stop, kinds["flood"]) for _ in range(options.flood)),
        *(
            slow(
                options.port,
                f"/v1/tenants/{options.slow_tenant}/imports",
                options.slow_key,
                stop,
                kinds["slow"],
            )
            for _ in range(options.slow)
        ),
        *(idle(options.port, stop, kinds["idle"]) for _ in range(options.idle)),
    ]
    running = [asyncio.create_task(task) for task in tasks]
    await asyncio.sleep(options.seconds)
    stop.set()
    await asyncio.wait(running, timeout=15)
    for name, counts in kinds.items():
        print(f"  hostile {name}: {dict(counts)}")


if __name__ == "__main__":
    asyncio.run(main())
