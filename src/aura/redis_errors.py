"""What "Redis cannot be reached" looks like to redis-py, for the parts that degrade
without it (the breaker falls back to local state, the retry tracker to the delivery's own
count): a refused or dropped connection, a timeout, or the socket error underneath."""

from __future__ import annotations

from redis import exceptions

__all__ = ["REDIS_UNREACHABLE"]

REDIS_UNREACHABLE: tuple[type[BaseException], ...] = (
    exceptions.ConnectionError,
    exceptions.TimeoutError,
    OSError,
)
