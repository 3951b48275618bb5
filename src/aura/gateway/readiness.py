"""What ``/readyz`` checks besides the database: Redis and the broker, each bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from kombu.connection import Connection
from redis.asyncio import Redis

from aura.config import Settings

__all__ = ["default_checks"]

_TIMEOUT = 2.0


def default_checks(settings: Settings) -> dict[str, Callable[[], Awaitable[None]]]:
    checks: dict[str, Callable[[], Awaitable[None]]] = {}
    if settings.redis_url is not None:
        redis_url = settings.redis_url

        async def redis_ping() -> None:
            client = Redis.from_url(
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
            with Connection(broker_url, connect_timeout=_TIMEOUT) as connection:
                connection.ensure_connection(max_retries=1)

        async def broker_ping() -> None:
            await asyncio.wait_for(asyncio.to_thread(connect), _TIMEOUT * 2)

        checks["broker"] = broker_ping
    return checks
