"""Redis behind Sentinel, on real servers this module starts (``PrivateSentinelRedis``: a
primary, a replica, three sentinels on free loopback ports; never the machine's Redis).

A client made from the ``redis+sentinel://`` URL follows the master: the primary is
SIGKILLed, the sentinels promote the replica, writes resume there; the old primary comes
back, the sentinels make it a replica, and no write lands on it. Meanwhile every Aura user
of Redis -- the retry counter, the breaker, the rate limiter -- takes its "Redis cannot
help" fallback and never raises; and so does one pointed straight at a replica (every
write ``READONLY``), or at a master the sentinels have just demoted.

Every wait is bounded and polls the servers; nothing asserts how long a step took.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from redis import exceptions

from aura.chaos.redis_sentinel import PrivateSentinelRedis
from aura.errors import CircuitOpenError
from aura.llm import CircuitBreaker
from aura.llm.ratelimit import RateLimit, RateLimiter
from aura.messaging import RetryTracker
from aura.redis_connect import async_redis

FALLBACK = 100  # the count a delivery knows of: a tracker answering FALLBACK + 1 fell back
BOUND_S = 30.0  # any one step of the failover; each is seconds at most on this machine


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateSentinelRedis]:
    servers = PrivateSentinelRedis(tmp_path_factory.mktemp("sentinel"), quick=True)
    servers.start()
    try:
        yield servers
    finally:
        servers.stop()


def _direct(port: int) -> aioredis.Redis:
    return aioredis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5)


async def _fails() -> None:
    raise RuntimeError("provider down")


async def _ok() -> str:
    return "answer"


async def test_an_aura_user_pointed_at_a_replica_falls_back(group: PrivateSentinelRedis) -> None:
    """The issue's failure: a REDIS_URL naming one server that is (now) a replica. Every
    write is refused READONLY, and every user takes its fallback."""
    client = async_redis(f"redis://127.0.0.1:{group.replica_port}/0", socket_timeout=0.5)
    name = f"replica-{uuid.uuid4().hex[:6]}"
    try:
        with pytest.raises(exceptions.ReadOnlyError):
            await client.incr("probe")  # the server really refuses
        tracker = RetryTracker(client, max_retries=3)
        assert await tracker.increment(name, fallback_count=2) == 3
        assert await tracker.increment_and_check(name, fallback_count=3)
        breaker = CircuitBreaker(name, fail_max=1, redis=client)
        with pytest.raises(RuntimeError):
            await breaker.call(_fails)
        with pytest.raises(CircuitOpenError):  # opened on local state: fail fast holds
            await breaker.call(_ok)
        limiter = RateLimiter(name, RateLimit(rpm=60), redis=client)
        assert await limiter.acquire(10, max_wait=1.0) == 0.0
    finally:
        await client.aclose()


async def test_a_master_demoted_under_its_connections_is_left_for_the_new_one(
    group: PrivateSentinelRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sentinel pool still has the old master's address when it is already a replica
    (here: the pool is told so): its READONLY is turned into a ConnectionError by
    redis-py's sentinel connection, which drops itself -- a fallback for that call -- and
    the next connection asks the sentinels again and reaches the master."""
    client = async_redis(group.url, max_connections=4, pool_timeout=1.0, socket_timeout=0.5)
    tracker = RetryTracker(client, max_retries=3)
    pool = client.connection_pool
    run = uuid.uuid4().hex[:8]

    async def stale_address() -> tuple[str, int]:
        return "127.0.0.1", group.replica_port

    try:
        monkeypatch.setattr(pool, "get_master_address", stale_address)
        assert await tracker.increment(f"{run}-a", fallback_count=FALLBACK) == FALLBACK + 1
        with pytest.raises(exceptions.ConnectionError, match="previous master is now a slave"):
            await client.incr(f"{run}-probe")
        monkeypatch.undo()
        assert await tracker.increment(f"{run}-b", fallback_count=FALLBACK) == 1
        primary = _direct(group.primary_port)
        try:
            assert await primary.get(tracker.key(f"{run}-b")) == b"1"
        finally:
            await primary.aclose()
    finally:
        await client.aclose()


async def _through_the_failover(
    group: PrivateSentinelRedis, client: aioredis.Redis, run: str
) -> tuple[int, list[str], str]:
    """Kill the primary and use every Aura user until a write reaches the new master; the
    new master's port, how each count was kept (``redis`` or ``fallback``), the last key."""
    tracker = RetryTracker(client, max_retries=3)
    breaker = CircuitBreaker(f"failover-{run}", fail_max=10_000, redis=client)
    limiter = RateLimiter(f"failover-{run}", RateLimit(rpm=6_000_000), redis=client)
    group.kill_primary()
    promoted = asyncio.ensure_future(asyncio.to_thread(group.wait_for_new_primary, BOUND_S))
    paths: list[str] = []
    deadline = asyncio.get_running_loop().time() + BOUND_S
    while not (promoted.done() and paths and paths[-1] == "redis"):
        message_id = f"{run}-{len(paths)}"
        counted = await tracker.increment(message_id, fallback_count=FALLBACK)  # never raises
        assert counted in (1, FALLBACK + 1)
        paths.append("redis" if counted == 1 else "fallback")
        with pytest.raises(RuntimeError):  # the call's own error, never Redis's
            await breaker.call(_fails)
        assert await limiter.acquire(1, max_wait=1.0) >= 0.0
        assert asyncio.get_running_loop().time() < deadline, "writes never reached a new master"
        await asyncio.sleep(0.02)  # a poll's pace, not a wait for anything
    return await promoted, paths, tracker.key(f"{run}-{len(paths) - 1}")


async def _old_primary_back(
    group: PrivateSentinelRedis, client: aioredis.Redis, old: int, run: str
) -> tuple[list[str], int]:
    """Restart the old primary while writing through the client; every time it is seen as
    a master (before the sentinels demote it) it must hold no key. The keys written, and
    how many times it was seen empty as a master."""
    back = asyncio.ensure_future(asyncio.to_thread(group.restart_old_primary, BOUND_S))
    written: list[str] = []
    seen_empty = 0
    direct = _direct(old)
    try:
        while not back.done():
            key = f"{run}:during:{len(written)}"
            await client.set(key, "1")
            written.append(key)
            try:
                async with direct.pipeline(transaction=True) as pipe:
                    pipe.role()
                    pipe.dbsize()
                    role, size = await pipe.execute()
            except exceptions.ConnectionError:
                continue  # not up yet
            if role[0] == b"master":
                assert size == 0, "a write landed on the old primary"
                seen_empty += 1
            await asyncio.sleep(0.02)
        await back
        assert (await direct.role())[0] == b"slave"
    finally:
        await direct.aclose()
    return written, seen_empty


async def test_writes_follow_the_master_through_a_failover(group: PrivateSentinelRedis) -> None:
    client = async_redis(
        group.url, max_connections=20, pool_timeout=1.0, socket_timeout=0.5,
        socket_connect_timeout=0.5,
    )  # fmt: skip
    run = uuid.uuid4().hex[:8]
    try:
        await client.set(f"{run}:before", "1")
        # Replication is asynchronous: a write the primary took just before it died may be
        # lost with it, unless the replica has it (WAIT). Aura's counters accept that loss.
        assert await client.execute_command("WAIT", 1, 5000) == 1
        old = group.primary_port
        new, paths, last_key = await _through_the_failover(group, client, run)
        assert new != old
        assert new == group.primary_port
        assert paths[0] == "fallback"  # the kill was felt at once, and fallen back on
        assert paths[-1] == "redis"
        written, _ = await _old_primary_back(group, client, old, run)
        await client.set(f"{run}:after", "1")
        primary = _direct(new)
        try:
            assert await primary.get(last_key) == b"1"
            keys = [f"{run}:before", *written, f"{run}:after"]
            assert await primary.exists(*keys) == len(keys)
        finally:
            await primary.aclose()
        assert group.role(old) == "slave"
        assert group.role(new) == "master"
    finally:
        await client.aclose()
