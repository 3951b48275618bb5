"""The fleet-wide rate limiter: its cost per call, and a fleet held under a provider limit.

    .venv/bin/python bench/llm_ratelimit.py [--processes 8] [--calls 200] [--rpm 6000]

1. Cost: ``RateLimiter.acquire`` (one EVALSHA, limits far above the load so it never
   waits) against a Redis PING, same connection, same run: the ratio is the price of the
   script over a bare round trip. Round trips per call are counted.
2. Fleet: PROCESSES processes (tests/llm_peer.py), each with CALLS calls in flight at
   once, against the simulator limited to RPM requests per minute (burst 1 s), the
   processes limited to the same RPM through Redis (burst 0.25 s). Reported: the share of
   requests answered 429 (target <= 1 %), throughput against the limit (target within
   10 %), and calls deferred (target 0 with a long enough LLM_RATE_LIMIT_MAX_WAIT). The
   issue's own figure is ``--rpm 600`` (8 x 200 at 600/min: about 160 s).
3. With ``--configured-rpm`` above ``--rpm`` the fleet believes in a higher limit than
   the provider's; ``--adaptive``/``--no-adaptive`` (LLM_RATE_LIMIT_ADAPTIVE) compares
   the 429 share with and without the AIMD share finding the real limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections import Counter
from typing import Any

import redis.asyncio as aioredis

from aura.llm import Faults, LLMSimulator, RateLimit, RateLimiter
from aura.logs import configure_logging

REPEATS = 5


async def cost(redis_url: str, calls: int) -> None:
    redis = aioredis.from_url(redis_url)
    limiter = RateLimiter(
        f"bench-{uuid.uuid4().hex[:6]}/m", RateLimit(rpm=1e9, tpm=1e12), redis=redis
    )
    await limiter.acquire(10, 1.0)  # loads the script
    await redis.ping()
    sent: list[object] = []
    real = redis.execute_command

    async def counting(*args: object, **kwargs: object) -> object:
        sent.append(args[0])
        return await real(*args, **kwargs)

    best_ping = best_acquire = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        for _ in range(calls):
            await redis.ping()
        best_ping = min(best_ping, time.perf_counter() - started)
        redis.execute_command = counting  # type: ignore[method-assign]
        started = time.perf_counter()
        for _ in range(calls):
            await limiter.acquire(10, 1.0)
        best_acquire = min(best_acquire, time.perf_counter() - started)
        redis.execute_command = real  # type: ignore[method-assign]
    await redis.aclose()
    per_ping, per_acquire = best_ping / calls * 1e6, best_acquire / calls * 1e6
    trips = len(sent) / (calls * REPEATS)
    print(f"redis PING                 {per_ping:8.1f} us")
    print(f"RateLimiter.acquire        {per_acquire:8.1f} us   ({trips:g} round trip per call)")
    print(f"--- acquire / PING: {per_acquire / per_ping:.2f}")


async def start_peer(url: str, redis_url: str, go_key: str, calls: int, env: dict[str, str]) -> Any:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.llm_peer",
        "burst",
        url,
        redis_url,
        "bench-rl",
        str(calls),
        go_key,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "LOG_LEVEL": "ERROR", **env},
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 60)
    assert line.strip() == b"ready", line
    return process


async def fleet(
    redis_url: str,
    processes: int,
    calls: int,
    rpm: float,
    ceiling: float,
    adaptive: bool,
    spread: float,
) -> None:
    model = f"bench-{uuid.uuid4().hex[:6]}"
    go_key = f"{model}:go"
    env = {
        "LLM_RATE_LIMIT_RPM": str(ceiling),
        "LLM_RATE_LIMIT_ADAPTIVE": str(adaptive).lower(),
        "LLM_RATE_LIMIT_BURST": "0.25",
        "LLM_RATE_LIMIT_MAX_WAIT": str(processes * calls / rpm * 60 + 30),
        "PEER_MODELS": model,
        "PEER_SPREAD_S": str(spread),
    }
    redis = aioredis.from_url(redis_url)
    async with LLMSimulator(Faults(rpm=rpm)) as sim:
        peers = await asyncio.gather(
            *(start_peer(sim.base_url, redis_url, go_key, calls, env) for _ in range(processes))
        )
        started = time.monotonic()
        await redis.set(go_key, 1, ex=600)
        outcomes: Counter[str] = Counter()
        for peer in peers:
            line = await peer.stdout.readline()
            outcomes.update(json.loads(line)["outcomes"])
            await peer.wait()
        elapsed = time.monotonic() - started
        requests, limited = sim.requests, sim.stats["rate_limited"]
    await redis.aclose()
    total = processes * calls
    achieved = (total - rpm / 60 / 4) / max(elapsed, spread) * 60
    print(
        f"fleet: {processes} processes x {calls} calls (started over {spread:g} s), provider "
        f"limit {rpm:g}/min, fleet configured {ceiling:g}/min, adaptive "
        f"{'on' if adaptive else 'off'}"
    )
    print(f"  outcomes: {dict(outcomes)}")
    print(f"  requests {requests}, answered 429: {limited} ({limited / requests:.2%})")
    print(f"  elapsed {elapsed:.1f} s; throughput {achieved:.0f}/min")
    print(f"--- throughput / limit: {achieved / rpm:.3f}; 429 share: {limited / requests:.4f}")


async def main(args: argparse.Namespace) -> None:
    configure_logging("ERROR")
    if args.cost_calls:
        await cost(args.redis_url, args.cost_calls)
    ceiling = args.configured_rpm or args.rpm
    await fleet(
        args.redis_url, args.processes, args.calls, args.rpm, ceiling, args.adaptive, args.spread
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--cost-calls", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rpm", type=float, default=6000.0)
    parser.add_argument(
        "--configured-rpm",
        type=float,
        default=0.0,
        help="the fleet's LLM_RATE_LIMIT_RPM (default: --rpm); above it, the adaptive "
        "limit has to find the provider's real one",
    )
    parser.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--spread",
        type=float,
        default=0.0,
        help="each process starts its calls evenly "
        "over this many seconds (default 0: all at once, a burst)",
    )
    asyncio.run(main(parser.parse_args()))
