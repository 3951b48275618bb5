"""A breaker's record in Redis: one hash per breaker, read with Redis's clock, changed
atomically, and listed for ``aura breaker status``.

Every change is the pure ``transition`` applied inside one WATCH/MULTI transaction
(redis-py's ``transaction`` retries on conflict), so two processes never both take the
trial or both lose a failure. A read fetches ``TIME`` with the record in one pipelined
round trip: shared times are on Redis's clock, whatever a host's wall clock says. What
to do when Redis cannot help is the breaker's call (``aura.llm.breaker``), not this one's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from aura.llm._breaker_state import BreakerRecord, Decision

__all__ = ["REGISTRY_KEY", "BreakerStore"]

# Every shared breaker's name, scored by when a process last started using it: the hash
# of a breaker that never failed is empty, and ``aura breaker status`` lists it from here
REGISTRY_KEY = "aura:circuit_breakers"

Step = Callable[[BreakerRecord], tuple[BreakerRecord, Decision]]


class BreakerStore:
    """The shared record of the breaker ``name`` (its hash: ``key``)."""

    def __init__(self, redis: Redis, name: str, key: str) -> None:
        self._redis = redis
        self.name = name
        self.key = key

    async def read(self, *, with_time: bool) -> tuple[BreakerRecord, float | None]:
        """The record, and Redis's clock (TIME, epoch seconds) with it when asked."""
        if not with_time:
            return BreakerRecord.from_redis(await self._redis.hgetall(self.key)), None
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.hgetall(self.key)
            (seconds, micros), raw = await pipe.execute()
        return BreakerRecord.from_redis(raw), float(seconds) + float(micros) / 1e6

    async def register(self, now: float) -> None:
        """List the breaker for ``aura breaker status`` (its hash may stay empty)."""
        await self._redis.zadd(REGISTRY_KEY, {self.name: now})

    async def apply(self, step: Step) -> tuple[BreakerRecord, Decision]:
        """``step`` applied to the stored record atomically; written only if it changed."""
        outcome: list[tuple[BreakerRecord, Decision]] = []

        async def atomically(pipe: Any) -> None:
            current = BreakerRecord.from_redis(await pipe.hgetall(self.key))
            record, decision = step(current)
            outcome[:] = [(record, decision)]
            pipe.multi()
            if record != current:
                pipe.hset(self.key, mapping=record.to_redis())

        await self._redis.transaction(atomically, self.key)
        return outcome[0]
