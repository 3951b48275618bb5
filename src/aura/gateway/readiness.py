"""What ``/readyz`` checks besides the database: Redis and the broker, each bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from kombu.connection import Connection

from aura.config import Settings
from aura.messaging.topology import broker_nodes
from aura.redis_connect import async_redis

__all__ = ["ADVISORY_CHECKS", "ReadinessProbe", "default_checks"]

# Checks /readyz reports but does not wait on. Redis: the gateway itself never uses it,
# and every Redis user in the fleet degrades without it ("Redis cannot help"), so a
# Redis failover (no master named for seconds) must not take every gateway out of its
# Service at once.
ADVISORY_CHECKS = frozenset({"redis"})

_TIMEOUT = 2.0


def default_checks(settings: Settings) -> dict[str, Callable[[], Awaitable[None]]]:
    checks: dict[str, Callable[[], Awaitable[None]]] = {}
    if settings.redis_url is not None:
        redis_url = settings.redis_url

        async def redis_ping() -> None:
            client = async_redis(
                redis_url, socket_timeout=_TIMEOUT, socket_connect_timeout=_TIMEOUT
            )
            try:
                await client.ping()
            finally:
                await client.aclose()

        checks["redis"] = redis_ping
    if settings.celery_broker_url is not None and not settings.celery_broker_url.startswith(
        "memory"
    ):
        broker_url = settings.celery_broker_url

        def connect() -> None:
            """Any node of the list answers (kombu, given the whole list and no retry,
            tries only its first node: two dead nodes of three read as down)."""
            failure: BaseException = ConnectionError("no broker node")
            for node in broker_nodes(broker_url) or [broker_url]:
                try:
                    with Connection(node, connect_timeout=_TIMEOUT) as connection:
                        connection.ensure_connection(max_retries=0)
                except Exception as exc:  # that node is down: the next may answer
                    failure = exc
                    continue
                return
            raise failure

        async def broker_ping() -> None:
            await asyncio.wait_for(asyncio.to_thread(connect), _TIMEOUT * 4)

        checks["broker"] = broker_ping
    return checks


class ReadinessProbe:
    """``/readyz``'s answer, from state refreshed at most once per ``interval``.

    Each call used to open a database session and new Redis and AMQP connections: 60
    concurrent callers drove a gateway to its pool cap and a tenant's worst request to
    4,987 ms. Now a call answers the latest snapshot; one that finds it older than
    ``interval`` starts the refresh (one at a time, whoever asks) and still answers at
    once. Only the very first call waits for the first probe, bounded."""

    def __init__(
        self,
        probe: Callable[[], Awaitable[dict[str, str]]],
        *,
        interval: float = 1.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        import time

        self.probe = probe
        self.interval = interval
        self.clock = clock or time.monotonic
        self.snapshot: dict[str, str] | None = None
        self.taken_at = float("-inf")
        self.probes = 0
        self._running: asyncio.Task[None] | None = None

    async def _refresh(self) -> None:
        try:
            self.snapshot = await self.probe()
        except Exception as exc:  # the answer is "not ready", never an error
            self.snapshot = {"probe": f"unavailable: {type(exc).__name__}"}
        self.taken_at = self.clock()
        self.probes += 1

    async def checks(self) -> dict[str, str]:
        stale = self.clock() - self.taken_at >= self.interval
        if stale and (self._running is None or self._running.done()):
            self._running = asyncio.create_task(self._refresh())
        if self.snapshot is None and self._running is not None:
            await asyncio.wait({self._running}, timeout=_TIMEOUT * 3)
        return dict(self.snapshot or {"probe": "starting"})
