"""RetryTracker pinned where a user would notice a change: the seed's defaults, the
bounds, what goes over the wire, and Redis down and back (found by scripts/mutation.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from aura.messaging._retry import KEY_PREFIX, RetryTracker


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


def test_the_seeds_defaults() -> None:
    tracker = RetryTracker(None)  # type: ignore[arg-type]
    assert (tracker.max_retries, tracker.ttl, tracker.prefix) == (3, 3600, "retry_count:")
    assert KEY_PREFIX == "retry_count:"
    assert tracker.key("m-1") == "retry_count:m-1"


def test_the_bounds_are_inclusive_where_they_should_be() -> None:
    assert RetryTracker(None, max_retries=0, ttl=1).max_retries == 0  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="got -1"):
        RetryTracker(None, max_retries=-1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="got -5"):
        RetryTracker(None, ttl=-5)  # type: ignore[arg-type]


async def test_the_default_allows_three_retries_then_the_dlq(
    redis_client: aioredis.Redis,
) -> None:
    tracker = RetryTracker(redis_client)
    message_id = str(uuid.uuid4())
    verdicts = [await tracker.increment_and_check(message_id) for _ in range(4)]
    assert verdicts == [False, False, False, True]
    zero = RetryTracker(redis_client, max_retries=0)
    assert await zero.increment_and_check(str(uuid.uuid4()))  # first failure: DLQ


async def test_one_round_trip_is_multi_incr_expire_exec_with_the_ttl(
    redis_client: aioredis.Redis,
) -> None:
    """The TTL is read off the wire (EXPIRE key 3600), not off a clock."""
    sent: list[bytes] = []
    real = redis_client.connection_pool.get_connection

    async def recording(*args: object, **kwargs: object) -> object:
        connection = await real(*args, **kwargs)
        original = connection.send_packed_command

        async def send(command: object, *a: object, **k: object) -> object:
            chunks = command if isinstance(command, list | tuple) else [command]
            sent.append(b"".join(bytes(c) for c in chunks))
            return await original(command, *a, **k)

        connection.send_packed_command = send  # type: ignore[method-assign]
        return connection

    tracker = RetryTracker(redis_client)
    message_id = str(uuid.uuid4())
    redis_client.connection_pool.get_connection = recording  # type: ignore[method-assign]
    try:
        assert await tracker.increment(message_id) == 1
    finally:
        redis_client.connection_pool.get_connection = real  # type: ignore[method-assign]
    assert len(sent) == 1
    wire = sent[0]
    key = f"retry_count:{message_id}".encode()
    order = [wire.index(b"MULTI"), wire.index(b"INCR"), wire.index(b"EXPIRE"), wire.index(b"EXEC")]
    assert order == sorted(order)
    assert b"EXPIRE\r\n$%d\r\n%s\r\n$4\r\n3600\r\n" % (len(key), key) in wire
    ttl = await redis_client.ttl(key)
    assert 0 < ttl <= 3600


async def test_get_and_reset_read_and_clear_the_count(redis_client: aioredis.Redis) -> None:
    tracker = RetryTracker(redis_client, prefix="pins_retry:")
    message_id = str(uuid.uuid4())
    assert await tracker.get(message_id) == 0
    assert await tracker.increment(message_id) == 1
    assert await tracker.increment(message_id) == 2
    assert await redis_client.get(f"pins_retry:{message_id}") == b"2"
    assert await tracker.get(message_id) == 2
    await tracker.reset(message_id)
    assert await redis_client.exists(f"pins_retry:{message_id}") == 0


async def test_redis_down_and_back_is_logged_once_each_way(
    redis_client: aioredis.Redis,
) -> None:
    dead = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    tracker = RetryTracker(dead)
    message_id = str(uuid.uuid4())
    with capture_logs() as logs:
        assert await tracker.increment(message_id, fallback_count=0) == 1
        assert await tracker.increment(message_id, fallback_count=5) == 6
        assert await tracker.increment_and_check(message_id, fallback_count=3)
        tracker.redis = redis_client  # Redis is back
        assert await tracker.increment(message_id, fallback_count=7) == 1  # Redis counts
        assert await tracker.increment(message_id, fallback_count=7) == 2
        tracker.redis = dead  # down again: a new outage, logged again
        assert await tracker.increment(message_id, fallback_count=1) == 2
    await dead.aclose()
    said = [(entry["log_level"], entry["event"]) for entry in logs]
    down = (
        "error",
        "retry tracker cannot reach Redis; counting with the delivery's own retries",
    )
    up = ("warning", "retry tracker reaches Redis again")
    assert said == [down, up, down]
    assert "ConnectionError" in logs[0]["error"]
