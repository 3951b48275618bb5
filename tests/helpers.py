"""Small test helpers: bounded waiting on conditions, and reading metrics."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY

from aura.worker.process import start_worker_process, stop_worker_process

if TYPE_CHECKING:
    import uuid

    from aura.db import Database


async def wait_until(
    condition: Callable[[], Awaitable[bool]], *, within: float = 5.0, interval: float = 0.01
) -> None:
    """Poll ``condition`` until it holds; fail the test after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)


def metric(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


class FakeClock:
    """An injectable clock (epoch seconds) that moves only when a test says so."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def wait_for(condition: Callable[[], bool], *, within: float = 30.0, interval: float = 0.1) -> None:
    """The synchronous ``wait_until``: poll ``condition``; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        time.sleep(interval)


def start_celery_worker(
    app_module: str,
    env: dict[str, str],
    log: Path,
    *,
    pool: str = "prefork",
    concurrency: int = 2,
) -> subprocess.Popen[bytes]:
    """A real worker on both work queues (prefork, 2 children, unless told otherwise),
    logging to ``log``."""
    with log.open("wb") as output:
        env = {"WORKER_METRICS_PORT": "0", **env}  # no endpoint unless the test asks for one
        return start_worker_process(app_module, env, output, pool=pool, concurrency=concurrency)


def stop_celery_worker(process: subprocess.Popen[bytes]) -> None:
    """Warm shutdown, bounded; killed if it does not stop in 30 s."""
    stop_worker_process(process, timeout=30)


@contextlib.contextmanager
def running_celery_worker(
    app_module: str, env: dict[str, str], log: Path, *, pool: str, concurrency: int
) -> Iterator[subprocess.Popen[bytes]]:
    """``start_celery_worker``, stopped after; its log's tail printed when it did not exit
    cleanly (0, or SIGTERM's)."""
    process = start_celery_worker(app_module, env, log, pool=pool, concurrency=concurrency)
    try:
        yield process
    finally:
        stop_celery_worker(process)
        if process.returncode not in (0, -signal.SIGTERM):
            print(log.read_text()[-4000:])


@contextlib.contextmanager
def running_gateway(
    env: dict[str, str], log: Path
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A real ``aura gateway`` process on a free loopback port with ``env`` (on top of
    PATH, HOME, LANG and TMPDIR), logging to ``log``; yielded once /healthz answers
    (its log's tail if it dies first), stopped (SIGTERM, bounded) after."""
    import httpx

    from tests.services import free_port

    port = free_port()
    kept = {k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "LANG", "TMPDIR"}}
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "aura", "gateway", "--port", str(port)],
            env={**kept, **env}, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def healthy() -> bool:
        if process.poll() is not None:
            raise AssertionError(log.read_text()[-2000:])
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, within=30)
        yield port, process
    finally:
        process.terminate()
        process.wait(timeout=15)


async def forget_held_rows(database: Database) -> int:
    """Delete the outbox rows earlier tests' gateways held for fair dispatch and never
    released (their event loops are gone): a test's own dispatcher or worker would
    otherwise publish and process another test's import. Returns how many."""
    from sqlalchemy import delete

    from aura.db import HELD, OutboxMessage

    async with database.session() as session:
        result = await session.execute(
            delete(OutboxMessage).where(OutboxMessage.claimed_by == HELD.owner)
        )
        await session.commit()
    return int(getattr(result, "rowcount", 0) or 0)


async def outbox_rows(database: Database, tenant: uuid.UUID) -> int:
    """The tenant's rows in the outbox (held, staged or being published)."""
    from sqlalchemy import func, select

    from aura.db import OutboxMessage

    async with database.session() as session:
        left = await session.scalar(
            select(func.count()).select_from(OutboxMessage).where(OutboxMessage.tenant_id == tenant)
        )
    return int(left or 0)
