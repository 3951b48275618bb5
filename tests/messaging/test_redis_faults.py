"""Redis is an optimisation, for every error class: whatever Redis answers -- OOM,
READONLY, BUSY, LOADING, NOSCRIPT, MASTERDOWN, a full pool, a timeout, a dropped
connection -- every Aura call site that uses it takes its fallback, and a delivery still
reaches its one fate.

Two ways of making Redis fail: a client whose every reply is the error (each class at
each call site), and a private redis-server this module starts and makes refuse for real
(``maxmemory`` under ``noeviction``; ``REPLICAOF`` a master that is not there).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from celery import Celery
from redis import exceptions
from redis.asyncio.connection import Connection as RedisConnection

from aura.config import load_settings
from aura.errors import CircuitOpenError
from aura.llm import CircuitBreaker
from aura.llm.ratelimit import RateLimit, RateLimiter
from aura.messaging import DeadLetterQueue, RetryTracker, resilient_task
from aura.worker.celery_app import make_celery_app
from tests import services

pytestmark = pytest.mark.filterwarnings("ignore::celery.exceptions.CDeprecationWarning")

ERRORS: list[BaseException] = [
    exceptions.OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'."),
    exceptions.ReadOnlyError("READONLY You can't write against a read only replica."),
    exceptions.BusyLoadingError("LOADING Redis is loading the dataset in memory"),
    exceptions.ResponseError("BUSY Redis is busy running a script."),
    exceptions.NoScriptError("NOSCRIPT No matching script. Please use EVAL."),
    exceptions.ResponseError("MASTERDOWN Link with MASTER is down"),
    exceptions.MaxConnectionsError("Too many connections"),
    exceptions.TimeoutError("Timeout reading from socket"),
    exceptions.ConnectionError("Connection reset by peer"),
    exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"),
]
IDS = [f"{type(e).__name__}:{str(e).split()[0]}" for e in ERRORS]


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = services.OwnRedis(str(tmp_path_factory.mktemp("redis-faults")))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def failing_client(url: str, error: BaseException) -> aioredis.Redis:
    """A client of a real server whose every reply is ``error``."""

    class Failing(RedisConnection):  # type: ignore[misc]
        async def read_response(self, *args: Any, **kwargs: Any) -> Any:
            raise error

    client = aioredis.from_url(url)
    client.connection_pool.connection_class = Failing
    return client


@pytest.mark.parametrize("error", ERRORS, ids=IDS)
async def test_the_retry_counter_falls_back_to_the_deliverys_count(
    own_redis: str, error: BaseException
) -> None:
    client = failing_client(own_redis, error)
    try:
        tracker = RetryTracker(client, max_retries=3)
        assert await tracker.increment(str(uuid.uuid4()), fallback_count=1) == 2
        assert await tracker.increment_and_check(str(uuid.uuid4()), fallback_count=3)
        assert not await tracker.increment_and_check(str(uuid.uuid4()), fallback_count=0)
    finally:
        await client.aclose()


@pytest.mark.parametrize("error", ERRORS, ids=IDS)
async def test_the_breaker_carries_on_with_local_state(
    own_redis: str, error: BaseException
) -> None:
    client = failing_client(own_redis, error)
    breaker = CircuitBreaker(f"faults-{uuid.uuid4().hex[:6]}", fail_max=2, redis=client)

    async def ok() -> str:
        return "answer"

    async def fails() -> None:
        raise RuntimeError("provider down")

    try:
        assert await breaker.call(ok) == "answer"
        for _ in range(2):
            with pytest.raises(RuntimeError):
                await breaker.call(fails)
        with pytest.raises(CircuitOpenError):  # opened locally: fail fast still holds
            await breaker.call(ok)
    finally:
        await client.aclose()


@pytest.mark.parametrize("error", ERRORS, ids=IDS)
async def test_the_rate_limiter_lets_calls_through(own_redis: str, error: BaseException) -> None:
    client = failing_client(own_redis, error)
    limiter = RateLimiter(f"faults-{uuid.uuid4().hex[:6]}", RateLimit(rpm=60), redis=client)
    try:
        assert await limiter.acquire(10, max_wait=1.0) == 0.0
    finally:
        await client.aclose()


@pytest.fixture
def app() -> Celery:
    app = make_celery_app(load_settings())  # in-memory broker; eager: retries run inline
    app.conf.task_always_eager = True
    return app


@pytest.mark.parametrize("error", ERRORS, ids=IDS)
def test_every_delivery_reaches_its_fate_whatever_redis_answers(
    app: Celery, own_redis: str, error: BaseException
) -> None:
    """Through ``resilient_task``, with the process's Redis answering ``error`` to every
    command: a success is a success, a poison pill and an exhausted retry budget are dead
    letters with their reasons, an open circuit is deferred and then dead-lettered with
    its own -- never an escaped Redis error (which Celery would reject, and the broker
    dead-letter with no reason)."""
    from aura.messaging._runtime import process_runtime

    runtime = process_runtime(app)
    real = runtime.redis
    runtime.redis = failing_client(own_redis, error)
    runtime._trackers.clear()
    run = uuid.uuid4().hex[:8]
    names = {kind: f"tests.redisfaults.{kind}.{run}" for kind in ("ok", "poison", "flaky", "open")}

    @resilient_task(app=app, name=names["ok"], backoff_base=1.0, backoff_max=1.0)
    def ok(self: Any) -> str:
        return "done"

    @resilient_task(app=app, name=names["poison"])
    def poison(self: Any) -> None:
        raise KeyError("missing")

    @resilient_task(app=app, name=names["flaky"], backoff_base=1.0, backoff_max=1.0)
    def flaky(self: Any) -> None:
        raise ConnectionError("the provider is flaky")

    @resilient_task(app=app, name=names["open"], max_deferrals=2)
    def circuit(self: Any) -> None:
        raise CircuitOpenError("llm", 0.0)

    try:
        assert ok.apply().get() == "done"
        for task in (poison, flaky, circuit):
            task.apply(task_id=f"{task.name}-1")
    finally:
        runtime.run(runtime.redis.aclose())
        runtime.redis = real
        runtime._trackers.clear()
    with app.connection_for_write() as connection:
        letters = DeadLetterQueue(connection, app=app).list(limit=1000)
    fates = {x.task: x.reason.value for x in letters if x.task in names.values()}
    assert fates == {
        names["poison"]: "poison_pill",
        names["flaky"]: "max_retries_exceeded",
        names["open"]: "max_deferrals_exceeded",
    }


# -- a real Redis refusing --------------------------------------------------------------


@pytest.fixture
async def refusing(own_redis: str) -> AsyncIterator[aioredis.Redis]:
    admin = aioredis.from_url(own_redis)
    yield admin
    await admin.config_set("maxmemory", "0")
    await admin.execute_command("REPLICAOF", "NO", "ONE")
    await admin.aclose()


@pytest.mark.parametrize("how", ["oom", "readonly"])
async def test_a_real_redis_refusing_writes_is_fallen_back_on(
    refusing: aioredis.Redis, own_redis: str, how: str
) -> None:
    await refusing.set("ballast", "x" * 100_000)
    if how == "oom":  # maxmemory reached, nothing may be evicted: every write is OOM
        await refusing.config_set("maxmemory-policy", "noeviction")
        await refusing.config_set("maxmemory", "1")
        expected: type[BaseException] = exceptions.OutOfMemoryError
    else:  # a replica after a failover: every write is READONLY
        await refusing.execute_command("REPLICAOF", "127.0.0.1", "1")
        expected = exceptions.ReadOnlyError
    client = aioredis.from_url(own_redis)
    try:
        with pytest.raises(expected):
            await client.incr("probe")  # the server really refuses
        tracker = RetryTracker(client, max_retries=3)
        assert await tracker.increment(str(uuid.uuid4()), fallback_count=2) == 3
        breaker = CircuitBreaker(f"real-{how}-{uuid.uuid4().hex[:6]}", fail_max=1, redis=client)

        async def fails() -> None:
            raise RuntimeError("down")

        with pytest.raises(RuntimeError):
            await breaker.call(fails)
        with pytest.raises(CircuitOpenError):
            await breaker.call(fails)
    finally:
        await client.aclose()


async def test_two_processes_whose_clocks_disagree_share_one_on_redis(own_redis: str) -> None:
    """One breaker's wall clock is 600 s ahead: both read the opened breaker's deadline
    on Redis's clock, so both are told to wait the reset timeout, not 0 s or 600 s more."""
    import time

    name = f"skew-{uuid.uuid4().hex[:6]}"
    ahead_client, on_time_client = aioredis.from_url(own_redis), aioredis.from_url(own_redis)
    ahead = CircuitBreaker(
        name, fail_max=1, reset_timeout=30, redis=ahead_client,
        clock=lambda: time.time() + 600, redis_time=True,
    )  # fmt: skip
    on_time = CircuitBreaker(name, fail_max=1, reset_timeout=30, redis=on_time_client)

    async def fails() -> None:
        raise RuntimeError("down")

    async def ok() -> str:
        return "answer"

    try:
        assert await on_time.call(ok) == "answer"  # both have read the record once
        assert await ahead.call(ok) == "answer"
        with pytest.raises(RuntimeError):
            await ahead.call(fails)  # the process ahead opens it
        waits = []
        for breaker in (ahead, on_time):
            breaker._fresh_until = float("-inf")  # read the record now, not in a second
            with pytest.raises(CircuitOpenError) as refused:
                await breaker.call(ok)
            waits.append(refused.value.retry_after)
        assert all(25 < wait <= 30 for wait in waits), waits
    finally:
        await ahead_client.aclose()
        await on_time_client.aclose()


async def test_rate_limiters_whose_clocks_disagree_pace_on_redis_time(own_redis: str) -> None:
    """A process 600 s ahead reserves a slot; the one on time is paced by one interval,
    not refused for ten minutes (each used to put its own wall clock in the shared TAT)."""
    import time

    slept: list[float] = []

    async def no_sleep(seconds: float) -> None:
        slept.append(seconds)

    name = f"skew-{uuid.uuid4().hex[:6]}"
    limit = RateLimit(rpm=60, burst_s=1.0, adaptive=False)
    clients = [aioredis.from_url(own_redis) for _ in range(2)]
    ahead = RateLimiter(
        name, limit, redis=clients[0], clock=lambda: time.time() + 600, sleep=no_sleep,
        redis_time=True,
    )  # fmt: skip
    on_time = RateLimiter(name, limit, redis=clients[1], sleep=no_sleep)
    try:
        assert await ahead.acquire(1, max_wait=5.0) == 0.0
        waited = await on_time.acquire(1, max_wait=5.0)  # one interval (1 s) at most
        assert 0.0 < waited <= 1.0
    finally:
        for client in clients:
            await client.aclose()


def test_deferrals_do_not_spend_the_retry_budget_when_redis_cannot_count(
    app: Celery, own_redis: str
) -> None:
    """Redis refusing (OOM): the failure count falls back to the message's own
    ``aura_failures`` header, not Celery's retries (deferrals count there too: a message
    put off three times by an open breaker was dead-lettered on its first failure)."""
    from aura.messaging._runtime import process_runtime

    runtime = process_runtime(app)
    real = runtime.redis
    runtime.redis = failing_client(own_redis, ERRORS[0])
    runtime._trackers.clear()
    attempts: list[str] = []
    name = f"tests.redisfaults.budget.{uuid.uuid4().hex[:8]}"

    @resilient_task(app=app, name=name, max_retries=1, backoff_base=1.0, backoff_max=1.0)
    def describe(self: Any) -> str:
        attempts.append("call")
        if len(attempts) <= 3:
            raise CircuitOpenError("llm", 0.0)  # deferred: no failure
        if len(attempts) == 4:
            raise ConnectionError("the provider is flaky")  # the first failure: retried
        return "described"

    try:
        assert describe.apply(task_id=f"{name}-1").get() == "described"
    finally:
        runtime.run(runtime.redis.aclose())
        runtime.redis = real
        runtime._trackers.clear()
    assert len(attempts) == 5
