"""Retry tracking in Redis: how many times has this message failed?

``increment_and_check`` is one round trip (INCR and EXPIRE in one MULTI/EXEC) and returns
True once the count exceeds ``max_retries``: with the default 3, failures 1-3 are retried
and the 4th goes to the DLQ -- max_retries + 1 executions in all.

If Redis cannot be reached, the caller's own count (Celery's ``request.retries``) stands
in, so a message is never retried forever, nor lost, because Redis is gone; that is
logged once per outage, not per message.
"""

from __future__ import annotations

import structlog
from redis.asyncio import Redis

from aura.errors import ServiceUnavailableError
from aura.logs import describe_exception
from aura.message_id import validate_message_id
from aura.redis_errors import REDIS_UNREACHABLE

__all__ = ["KEY_PREFIX", "RetryTracker"]

KEY_PREFIX = "retry_count:"
_log = structlog.get_logger("aura.messaging.retry")


class RetryTracker:
    """Counts failures per message id in ``retry_count:{message_id}`` with a TTL."""

    def __init__(
        self,
        redis_client: Redis,
        max_retries: int = 3,
        ttl: int = 3600,
        *,
        prefix: str = KEY_PREFIX,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if ttl <= 0:
            raise ValueError(f"ttl must be > 0 seconds, got {ttl}")
        self.redis = redis_client
        self.max_retries = max_retries
        self.ttl = ttl
        self.prefix = prefix
        self._redis_down = False

    def key(self, message_id: str) -> str:
        return self.prefix + validate_message_id(message_id)

    async def increment_and_check(
        self, message_id: str, *, fallback_count: int | None = None
    ) -> bool:
        """Count one more failure; True when the message should go to the DLQ.

        ``fallback_count`` is the failures the caller knows of before this one (Celery's
        ``request.retries``); it is used only when Redis cannot be reached.
        """
        return await self.increment(message_id, fallback_count=fallback_count) > self.max_retries

    async def increment(self, message_id: str, *, fallback_count: int | None = None) -> int:
        """Count one more failure and return the count, this one included (one round trip;
        ``fallback_count`` as for ``increment_and_check``)."""
        key = self.key(message_id)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, self.ttl)
                count, _ = await pipe.execute()
        except REDIS_UNREACHABLE as exc:
            if fallback_count is None:
                raise ServiceUnavailableError(
                    f"cannot reach Redis to count retries: {exc}"
                ) from exc
            self._note_down(exc)
            count = fallback_count + 1
        else:
            self._note_up()
        return int(count)

    async def get(self, message_id: str) -> int:
        value = await self.redis.get(self.key(message_id))
        return int(value or 0)

    async def reset(self, message_id: str) -> None:
        await self.redis.delete(self.key(message_id))

    def _note_down(self, exc: BaseException) -> None:
        if not self._redis_down:
            self._redis_down = True
            _log.error(
                "retry tracker cannot reach Redis; counting with the delivery's own retries",
                error=describe_exception(exc),
            )

    def _note_up(self) -> None:
        if self._redis_down:
            self._redis_down = False
            _log.warning("retry tracker reaches Redis again")
