"""What the LLM tests share: a provider failure to count, calls that succeed or fail, an
injected sleep that records its waits, and the peer process that shares Redis."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import pytest

from aura.llm import CircuitBreaker
from tests.helpers import FakeClock

POLICY = {"fail_max": 3, "reset_timeout": 60.0, "trial_lease": 35.0}
MESSAGES = [{"role": "user", "content": "hello"}]


class Boom(Exception):
    """The provider failing: what the breakers under test count."""


async def ok() -> str:
    return "ok"


async def boom() -> str:
    raise Boom("provider down")


def counts_boom(exc: BaseException) -> bool:
    return isinstance(exc, Boom)


async def fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        with pytest.raises(Boom):
            await breaker.call(boom)


class Sleeps:
    """An injected sleep that records how long it was asked to wait and returns at once."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(round(seconds, 6))


class Peer:
    """The other process (tests/llm_peer.py): started, waited on until ready, then read
    for its one result."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, *args: str, env: dict[str, str] | None = None) -> Peer:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.llm_peer",
            *args,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "LOG_LEVEL": "ERROR", **(env or {})},
        )
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 20)
        assert line.strip() == b"ready", line
        return cls(process)

    async def result(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 30)
        assert await asyncio.wait_for(self.process.wait(), 10) == 0
        result: dict[str, Any] = json.loads(line)
        return result
