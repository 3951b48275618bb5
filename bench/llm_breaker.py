"""Per-call overhead of Aura's circuit breaker next to pybreaker's and a bare call,
one caller at a time and under load.

    .venv/bin/python bench/llm_breaker.py [--calls N] [--callers 200]

Runs everything in one process against a redis-server of its own (its command counter
is the bench's: INFO ``total_commands_processed``), times with this process's CPU time
(time spent descheduled on a shared machine is not the breaker's), takes the best of
several repeats, and prints ratios last. Targets (DESIGN.md, issue 16): closed-state
success < 1 us over a bare call with 0 Redis round trips of its own; open-state rejection
< 5 us.

1. One caller: a coroutine that returns at once, awaited in a loop. pybreaker has no
   asyncio support, so it is measured on a synchronous function against a bare
   synchronous call.
2. Under load: CALLERS coroutines at once, each awaiting calls that suspend once
   (``asyncio.sleep(0)``, as a real call does), through a shared (Redis) breaker: closed;
   closed as ``ResilientLLMClient`` picks it (``breaker_for(model)`` each call); closed
   with one failure in 1,000 calls (the run of failures is told to Redis, and ended by
   the next success); open (rejected). Baseline: the same callers with no breaker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pybreaker
import redis.asyncio as aioredis

from aura.config import Settings
from aura.errors import CircuitOpenError
from aura.llm import CircuitBreaker, ResilientLLMClient
from aura.logs import configure_logging

REPEATS = 7
ROOT = str(Path(__file__).resolve().parent.parent)  # for tests.services
LOAD_REPEATS = 11


async def noop() -> int:
    return 1


def sync_noop() -> int:
    return 1


async def best_async(body: Callable[[int], Awaitable[None]], calls: int) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        started = time.process_time()
        await body(calls)
        best = min(best, time.process_time() - started)
    return best / calls * 1e6


def best_sync(body: Callable[[int], None], calls: int) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        started = time.process_time()
        body(calls)
        best = min(best, time.process_time() - started)
    return best / calls * 1e6


async def sequential(calls: int, redis_url: str) -> None:
    local = CircuitBreaker("bench-local")
    redis = aioredis.from_url(redis_url)
    shared = CircuitBreaker("bench-shared", redis=redis)

    async def bare(n: int) -> None:
        for _ in range(n):
            await noop()

    async def ours_closed(n: int) -> None:
        for _ in range(n):
            await local.call(noop)

    async def ours_shared(n: int) -> None:
        for _ in range(n):
            await shared.call(noop)

    opened = CircuitBreaker("bench-open", fail_max=1, reset_timeout=3600)

    async def fail() -> None:
        raise RuntimeError("down")

    with contextlib.suppress(RuntimeError):
        await opened.call(fail)

    async def ours_open(n: int) -> None:
        for _ in range(n):
            with contextlib.suppress(CircuitOpenError):
                await opened.call(noop)

    py_closed = pybreaker.CircuitBreaker(fail_max=3, reset_timeout=60)
    py_open = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=3600)
    with contextlib.suppress(ZeroDivisionError, pybreaker.CircuitBreakerError):
        py_open.call(lambda: 1 / 0)

    def bare_sync(n: int) -> None:
        for _ in range(n):
            sync_noop()

    def pybreaker_closed(n: int) -> None:
        for _ in range(n):
            py_closed.call(sync_noop)

    def pybreaker_open(n: int) -> None:
        for _ in range(n):
            with contextlib.suppress(pybreaker.CircuitBreakerError):
                py_open.call(sync_noop)

    await shared.call(noop)  # the first call loads the shared state
    commands = await command_count(redis)
    t_bare = await best_async(bare, calls)
    t_closed = await best_async(ours_closed, calls)
    shared_started = time.monotonic()
    t_shared = await best_async(ours_shared, calls)
    shared_seconds = time.monotonic() - shared_started
    round_trips = await command_count(redis) - commands - 1
    shared_calls = calls * REPEATS
    t_open = await best_async(ours_open, calls)
    t_bare_sync = best_sync(bare_sync, calls)
    t_py_closed = best_sync(pybreaker_closed, calls)
    t_py_open = best_sync(pybreaker_open, calls // 10)
    await redis.aclose()

    print(f"1. one caller; calls per repeat: {calls:,}; CPU time, best of {REPEATS}")
    print(f"bare async call                 {t_bare:7.3f} us")
    print(f"aura breaker, closed (local)    {t_closed:7.3f} us  (+{t_closed - t_bare:.3f})")
    print(f"aura breaker, closed (Redis)    {t_shared:7.3f} us  (+{t_shared - t_bare:.3f})")
    print(
        f"  Redis commands: {round_trips} in {shared_calls:,} calls over "
        f"{shared_seconds:.1f} s (refresh at most 1/s; none of the calls' own)"
    )
    print(f"aura breaker, open (reject)     {t_open:7.3f} us")
    print(f"bare sync call                  {t_bare_sync:7.3f} us")
    print(
        f"pybreaker, closed (sync)        {t_py_closed:7.3f} us  (+{t_py_closed - t_bare_sync:.3f})"
    )
    print(f"pybreaker, open (reject)        {t_py_open:7.3f} us")
    overhead = t_closed - t_bare
    print("--- ratios")
    print(f"closed overhead, aura / pybreaker: {overhead / (t_py_closed - t_bare_sync):.2f}")
    print(f"open rejection, aura / pybreaker:  {t_open / t_py_open:.2f}")
    print(f"closed call, aura / bare:          {t_closed / t_bare:.2f}")
    refresh_only = round_trips <= shared_seconds + 1  # at most one refresh per second
    print(f"target closed overhead < 1 us: {overhead:.3f} us, {_met(overhead < 1)}")
    print(f"target 0 Redis round trips of the call's own: {_met(refresh_only)}")
    print(f"target open rejection < 5 us: {t_open:.3f} us, {_met(t_open < 5)}")


async def command_count(redis: aioredis.Redis) -> int:
    """Commands the bench's own redis-server has run (this INFO included)."""
    return int((await redis.info("stats"))["total_commands_processed"])


async def tick() -> int:
    await asyncio.sleep(0)  # a real call suspends at least once
    return 1


class Down(Exception):
    pass


async def down() -> int:
    await asyncio.sleep(0)
    raise Down("provider down")


async def under_load(calls: int, callers: int, redis_url: str) -> None:
    redis = aioredis.from_url(redis_url)
    per_caller = max(calls // callers, 1)
    total = per_caller * callers

    async def run(one: Callable[[], Awaitable[object]]) -> float:
        """CPU seconds of this process for CALLERS callers x per_caller calls."""

        async def caller() -> None:
            for _ in range(per_caller):
                with contextlib.suppress(CircuitOpenError, Down):
                    await one()

        started = time.process_time()
        await asyncio.gather(*(caller() for _ in range(callers)))
        return time.process_time() - started

    closed = CircuitBreaker("load-closed", redis=redis, fail_max=10**9)
    client = ResilientLLMClient.from_settings(
        settings=Settings(), base_url="http://127.0.0.1:1/v1", redis=redis, breaker_name="load"
    )
    flaky = CircuitBreaker("load-flaky", redis=redis, fail_max=10**9)
    opened = CircuitBreaker("load-open", redis=redis, fail_max=1, reset_timeout=3600)
    with contextlib.suppress(Down):
        await opened.call(down)
    count = 0

    async def one_in_a_thousand() -> int:
        nonlocal count
        count += 1
        return await flaky.call(down if count % 1000 == 0 else tick)

    cases = {
        "bare (no breaker)": tick,
        "closed (Redis)": lambda: closed.call(tick),
        "closed, client's breaker_for": lambda: client.breaker_for("gpt-4o-mini").call(tick),
        "closed, 1 failure / 1,000": one_in_a_thousand,
        "open (reject)": lambda: opened.call(tick),
    }
    # Interleaved repeats (every case once per round), best of each: the machine's
    # load moves between rounds, and hits every case alike within one.
    best = dict.fromkeys(cases, float("inf"))
    commands = dict.fromkeys(cases, 0)
    for _ in range(LOAD_REPEATS):
        for label, one in cases.items():
            before = await command_count(redis)
            best[label] = min(best[label], await run(one))
            commands[label] += await command_count(redis) - before - 1
    results = {
        label: (best[label] / total * 1e6, commands[label] / (total * LOAD_REPEATS))
        for label in cases
    }
    await client.aclose()
    await redis.aclose()

    print(
        f"2. under load: {callers} callers x {per_caller} calls, CPU time of this process, "
        f"best of {LOAD_REPEATS} interleaved rounds"
    )
    t_bare = results["bare (no breaker)"][0]
    for label, (per_call, per_call_commands) in results.items():
        extra = f"(+{per_call - t_bare:.3f})" if label != "bare (no breaker)" else ""
        print(f"{label:30s} {per_call:7.3f} us {extra:9s} Redis commands/call", end=" ")
        print(f"{per_call_commands:.5f}")
    print("--- targets under load")
    for label in ("closed (Redis)", "closed, client's breaker_for"):
        overhead = results[label][0] - t_bare
        print(f"{label}: overhead < 1 us: {overhead:.3f} us, {_met(overhead < 1)}")
    flaky_overhead = results["closed, 1 failure / 1,000"][0] - t_bare
    print(f"closed, 1 failure / 1,000: overhead {flaky_overhead:.3f} us per call (no target)")
    t_open = results["open (reject)"][0]
    print(f"open rejection < 5 us: {t_open:.3f} us, {_met(t_open < 5)}")


async def main(calls: int, callers: int) -> None:
    configure_logging("ERROR")
    sys.path.insert(0, ROOT)
    from tests.services import OwnRedis  # a redis-server of the bench's own

    with tempfile.TemporaryDirectory() as directory:
        server = OwnRedis(directory)
        server.start()
        try:
            await sequential(calls, server.url)
            await under_load(calls, callers, server.url)
        finally:
            server.stop()


def _met(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--callers", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.callers))
