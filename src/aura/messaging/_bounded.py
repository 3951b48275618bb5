"""Waits with a bound of their own, outside any task's time limits: a publish awaited at
most ``PUBLISH_BOUND`` seconds (a broker that blocks its publishers), and work run on a
fresh loop in a thread of its own (for plain code that may be called inside a loop)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from aura.errors import ServiceUnavailableError

__all__ = ["PUBLISH_BOUND", "PublishTimeout", "publish_within", "run_in_own_loop"]

T = TypeVar("T")
PUBLISH_BOUND = 300.0  # seconds a retry or dead-letter publish may wait (a blocked broker)


class PublishTimeout(ServiceUnavailableError, TimeoutError):
    """A publish did not complete within its bound (its thread may still finish it)."""


async def publish_within(publish: Awaitable[T], bound: float) -> T:
    """``publish`` awaited at most ``bound`` seconds, else ``PublishTimeout``."""
    try:
        async with asyncio.timeout(bound):
            return await publish
    except TimeoutError:
        raise PublishTimeout(f"no answer from the broker within {bound:g} s") from None


def run_in_own_loop(
    work: Callable[[], Coroutine[Any, Any, T]],
    *,
    name: str = "aura-own-loop",
    timeout: float | None = None,
) -> T:
    """Run ``work()`` on a fresh event loop in a thread of its own and return what it
    returns (or raise what it raised): for plain code that may also be called from
    inside a running loop (the DLQ reader, a worker's start-up check). ``TimeoutError``
    when it takes longer than ``timeout`` (the thread is left to finish on its own)."""
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, asyncio.run(work())))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise TimeoutError(f"no answer within {timeout:g} s")
    ok, value = outcome[0]
    if not ok:
        raise value
    result: T = value
    return result
