"""Per-call overhead of Aura's circuit breaker next to pybreaker's and a bare call.

    .venv/bin/python bench/llm_breaker.py [--calls N]

Runs everything in one process, takes the best of several repeats, and prints ratios
last. Targets (DESIGN.md): closed-state success < 1 us over a bare call with 0 Redis
round trips; open-state rejection < 5 us. pybreaker has no asyncio support, so it is
measured on a synchronous function against a bare synchronous call.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import pybreaker
import redis.asyncio as aioredis

from aura.errors import CircuitOpenError
from aura.llm import CircuitBreaker
from aura.logs import configure_logging

REPEATS = 7


async def noop() -> int:
    return 1


def sync_noop() -> int:
    return 1


async def best_async(body: Callable[[int], Awaitable[None]], calls: int) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        await body(calls)
        best = min(best, time.perf_counter() - started)
    return best / calls * 1e6


def best_sync(body: Callable[[int], None], calls: int) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        body(calls)
        best = min(best, time.perf_counter() - started)
    return best / calls * 1e6


async def main(calls: int, redis_url: str) -> None:
    configure_logging("ERROR")
    local = CircuitBreaker("bench-local")
    redis = aioredis.from_url(redis_url)
    await redis.delete("aura:circuit_breaker:bench-shared", "aura:circuit_breaker:bench-open")
    shared = CircuitBreaker("bench-shared", redis=redis)
    round_trips = 0
    real_execute = redis.execute_command

    async def counting(*args: object, **kwargs: object) -> object:
        nonlocal round_trips
        round_trips += 1
        return await real_execute(*args, **kwargs)

    redis.execute_command = counting  # type: ignore[method-assign]

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
    round_trips = 0
    t_bare = await best_async(bare, calls)
    t_closed = await best_async(ours_closed, calls)
    shared_started = time.monotonic()
    t_shared = await best_async(ours_shared, calls)
    shared_seconds = time.monotonic() - shared_started
    shared_calls = calls * REPEATS
    t_open = await best_async(ours_open, calls)
    t_bare_sync = best_sync(bare_sync, calls)
    t_py_closed = best_sync(pybreaker_closed, calls)
    t_py_open = best_sync(pybreaker_open, calls // 10)
    await redis.aclose()

    print(f"calls per repeat: {calls:,}; best of {REPEATS}")
    print(f"bare async call                 {t_bare:7.3f} us")
    print(f"aura breaker, closed (local)    {t_closed:7.3f} us  (+{t_closed - t_bare:.3f})")
    print(f"aura breaker, closed (Redis)    {t_shared:7.3f} us  (+{t_shared - t_bare:.3f})")
    print(
        f"  Redis round trips: {round_trips} in {shared_calls:,} calls over "
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


def _met(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.redis_url))
