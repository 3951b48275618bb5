"""What "Redis cannot help" looks like to redis-py, for the parts that degrade without it
(the breaker falls back to local state, the retry and deferral counters to the delivery's
own count, the rate limiter lets calls through).

Every redis-py error, not only the connection class: a refused or dropped connection, a
timeout, a full pool, and the server's own refusals -- ``OOM`` (``maxmemory`` reached
under ``noeviction``), ``READONLY`` (a replica, after a failover), ``BUSY`` (a script
running), ``LOADING`` (a restart reading its data), ``NOSCRIPT``, ``MASTERDOWN`` -- and any
other ``ResponseError``. Treating only connection errors so let an ``OutOfMemoryError``
from the deferral counter escape the task: Celery rejected the message and the broker
dead-lettered it with no reason (277 of 360 enrichments in a 20 s OOM window). A
delivery's fate never depends on Redis: whatever it answers, the fallback is taken.
"""

from __future__ import annotations

from redis import exceptions

__all__ = ["REDIS_CANNOT_HELP", "REDIS_UNREACHABLE"]

REDIS_CANNOT_HELP: tuple[type[BaseException], ...] = (exceptions.RedisError, OSError)
REDIS_UNREACHABLE = REDIS_CANNOT_HELP  # the name its callers know
