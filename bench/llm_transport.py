"""HTTP client transports at high concurrency: wall time and CPU for N concurrent LLM calls.

    .venv/bin/python bench/llm_transport.py [--latency 1.0] [--concurrency 100 500]

The simulator runs in its own process (``aura llm-sim``), so only the client's CPU is
counted here. For each N, every variant sends N concurrent chat completions twice: a cold
round (connections opened) and a warm round (connections reused where the pool kept
them). Variants:

    httpx-default   httpx.AsyncClient with its default pool (100 connections, 20 kept)
    httpx-sized     httpx.AsyncClient with Limits(N, N)
    httpx-aiohttp   httpx.AsyncClient over httpx_aiohttp.AiohttpTransport, Limits(N, N)
                    (what ResilientLLMClient uses when LLM_HTTP_TRANSPORT=aiohttp)
    aiohttp         bare aiohttp.ClientSession, TCPConnector(limit=N): the floor

The ideal wall time of one round is the latency. Ratios against bare aiohttp come last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

BODY = {"model": "bench", "messages": [{"role": "user", "content": '{"title": "Bench lamp"}'}]}
TIMEOUT = httpx.Timeout(connect=30.0, read=30.0, write=30.0, pool=60.0)


@dataclass
class Round:
    wall_s: float
    cpu_s: float
    ok: int


async def measure(call: Callable[[], Awaitable[bool]], n: int) -> Round:
    cpu, wall = time.process_time(), time.perf_counter()
    results = await asyncio.gather(*(call() for _ in range(n)))
    return Round(time.perf_counter() - wall, time.process_time() - cpu, sum(results))


async def run_httpx(url: str, n: int, client: httpx.AsyncClient) -> list[Round]:
    async def call() -> bool:
        response = await client.post(f"{url}/chat/completions", json=BODY)
        return response.status_code == 200 and bool(response.json()["choices"])

    async with client:
        return [await measure(call, n) for _ in range(2)]


async def run_aiohttp(url: str, n: int) -> list[Round]:
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=n), timeout=timeout
    ) as session:

        async def call() -> bool:
            async with session.post(f"{url}/chat/completions", json=BODY) as response:
                body = await response.json()
                return response.status == 200 and bool(body["choices"])

        return [await measure(call, n) for _ in range(2)]


def variants(url: str, n: int) -> dict[str, Callable[[], Awaitable[list[Round]]]]:
    sized = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    return {
        "httpx-default": lambda: run_httpx(url, n, httpx.AsyncClient(timeout=TIMEOUT)),
        "httpx-sized": lambda: run_httpx(url, n, httpx.AsyncClient(timeout=TIMEOUT, limits=sized)),
        "httpx-aiohttp": lambda: run_httpx(
            url, n, httpx.AsyncClient(timeout=TIMEOUT, transport=AiohttpTransport(limits=sized))
        ),
        "aiohttp": lambda: run_aiohttp(url, n),
    }


def start_simulator(latency: float) -> tuple[subprocess.Popen[str], str]:
    aura = os.path.join(os.path.dirname(sys.executable), "aura")
    process = subprocess.Popen(
        [aura, "llm-sim", "--port", "0", "--latency", str(latency)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # "LLM simulator on http://127.0.0.1:PORT/v1 (...)"
    if "http://" not in line:
        process.kill()
        raise SystemExit(f"the simulator did not start: {line!r}")
    return process, line.split()[3]


async def main(latency: float, concurrencies: list[int]) -> None:
    process, url = start_simulator(latency)
    results: dict[tuple[str, int], list[Round]] = {}
    try:
        for n in concurrencies:
            for name, run in variants(url, n).items():
                rounds = await run()
                results[name, n] = rounds
                for label, r in zip(("cold", "warm"), rounds, strict=True):
                    print(
                        f"{name:14} n={n:4} {label}: wall {r.wall_s:6.2f} s  "
                        f"cpu {r.cpu_s * 1000:7.0f} ms  ({r.cpu_s / n * 1000:5.2f} ms/call)"
                        f"  ok {r.ok}/{n}",
                        flush=True,
                    )
    finally:
        process.terminate()
        process.wait(timeout=10)
    print(f"\nratios against bare aiohttp, same run (latency {latency:g} s):")
    summary = {}
    for (name, n), rounds in results.items():
        floor = results["aiohttp", n]
        for i, label in enumerate(("cold", "warm")):
            wall = rounds[i].wall_s / floor[i].wall_s
            cpu = rounds[i].cpu_s / max(floor[i].cpu_s, 1e-9)
            summary[f"{name} n={n} {label}"] = {"wall_x": round(wall, 2), "cpu_x": round(cpu, 2)}
            print(f"  {name:14} n={n:4} {label}: wall x{wall:5.2f}  cpu x{cpu:6.2f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[100, 500])
    args = parser.parse_args()
    asyncio.run(main(args.latency, args.concurrency))
