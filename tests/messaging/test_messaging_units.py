"""Poison pills and retry tracking: the pure parts exactly, the Redis parts on real Redis."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import pydantic
import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from aura.catalog import parse_product
from aura.errors import (
    CircuitOpenError,
    DatabaseTransactionError,
    InvalidInputError,
    LLMMalformedResponseError,
    LLMTimeoutError,
    ServiceUnavailableError,
)
from aura.messaging._poison import PoisonPillDetector
from aura.messaging._retry import RetryTracker


def raised(fn: object) -> BaseException:
    try:
        fn()  # type: ignore[operator]
    except BaseException as exc:
        return exc
    raise AssertionError("nothing raised")


detector = PoisonPillDetector()


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: json.loads("not json"), "malformed JSON: Expecting value at line 1 column 1"),
        (
            lambda: b"\xff\xfe".decode("utf-8"),
            "invalid encoding: not utf-8 (byte 0xff at position 0)",
        ),
        (lambda: {}["sku"], "missing required key 'sku'"),
        (lambda: None.title, "missing required attribute 'title'"),  # type: ignore[attr-defined]
        (lambda: int("x"), "invalid value: invalid literal for int() with base 10: 'x'"),
        (lambda: len(5), "wrong type: object of type 'int' has no len()"),  # type: ignore[arg-type]
        (lambda: parse_product({"variants": []}), "invalid message: invalid product: title"),
    ],
)
def test_the_seeds_poison_types_are_detected_with_a_readable_reason(
    make: object, reason: str
) -> None:
    exc = raised(make)
    assert detector.is_poison_pill(exc)
    assert detector.get_poison_reason(exc).startswith(reason)


def test_pydantic_validation_errors_are_poison() -> None:
    class Body(pydantic.BaseModel):
        sku: str

    exc = raised(lambda: Body.model_validate({}))
    assert detector.is_poison_pill(exc)
    assert detector.get_poison_reason(exc) == "invalid message: sku: Field required"


def test_poison_is_found_through_the_cause_chain() -> None:
    def wrapped() -> None:
        try:
            json.loads("{")
        except ValueError as exc:
            raise RuntimeError("could not parse the record") from exc

    exc = raised(wrapped)
    assert detector.is_poison_pill(exc)
    assert detector.get_poison_reason(exc).startswith("malformed JSON")


@pytest.mark.parametrize(
    "exc",
    [
        LLMTimeoutError("slow"),
        LLMMalformedResponseError("garbled"),
        DatabaseTransactionError("dropped"),
        CircuitOpenError("llm", 3.0),
        ServiceUnavailableError("redis down"),
        ConnectionError("reset"),
        TimeoutError("slow"),
    ],
)
def test_transient_errors_are_never_poison(exc: BaseException) -> None:
    assert not detector.is_poison_pill(exc)


def test_a_transient_error_wrapping_a_poison_type_is_not_poison() -> None:
    class TransientValueError(LLMTimeoutError, ValueError):
        pass

    def wrapped() -> None:
        try:
            {}["x"]
        except KeyError as exc:
            raise DatabaseTransactionError("connection dropped") from exc

    assert not detector.is_poison_pill(TransientValueError("both"))
    assert not detector.is_poison_pill(raised(wrapped))


def test_the_list_is_configurable() -> None:
    custom = PoisonPillDetector()
    custom.remove(ValueError)
    assert not custom.is_poison_pill(ValueError("bad"))
    assert custom.is_poison_pill(json.JSONDecodeError("x", "doc", 0))  # its own entry stays
    custom.add(LookupError)
    assert custom.is_poison_pill(IndexError("out of range"))
    assert InvalidInputError in custom.poison_types


def test_reasons_are_one_line_and_never_carry_secrets() -> None:
    exc = ValueError("bad dsn postgresql://app:hunter2@db/x\nsecond line")
    reason = detector.get_poison_reason(exc)
    assert "\n" not in reason
    assert "hunter2" not in reason


@given(st.binary(max_size=64))
def test_any_bytes_body_is_processed_or_poison(body: bytes) -> None:
    try:
        json.loads(body.decode("utf-8"))
        failure: BaseException | None = None
    except (UnicodeDecodeError, ValueError) as exc:
        failure = exc
    if failure is not None:
        assert detector.is_poison_pill(failure)
        assert detector.get_poison_reason(failure)


# -- RetryTracker on real Redis ------------------------------------------------------------


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_increment_and_check_counts_to_the_limit(redis_client: aioredis.Redis) -> None:
    tracker = RetryTracker(redis_client, max_retries=3, ttl=3600)
    message_id = str(uuid.uuid4())
    verdicts = [await tracker.increment_and_check(message_id) for _ in range(5)]
    assert verdicts == [False, False, False, True, True]
    assert await tracker.get(message_id) == 5
    ttl = await redis_client.ttl(f"retry_count:{message_id}")
    assert 3590 < ttl <= 3600
    await tracker.reset(message_id)
    assert await tracker.get(message_id) == 0


async def test_increment_and_check_is_one_round_trip(redis_client: aioredis.Redis) -> None:
    tracker = RetryTracker(redis_client)
    sent: list[object] = []
    real = redis_client.connection_pool.get_connection

    async def counting(*args: object, **kwargs: object) -> object:
        connection = await real(*args, **kwargs)
        original = connection.send_packed_command

        async def send(command: object, *a: object, **k: object) -> object:
            sent.append(command)
            return await original(command, *a, **k)

        connection.send_packed_command = send  # type: ignore[method-assign]
        return connection

    redis_client.connection_pool.get_connection = counting  # type: ignore[method-assign]
    try:
        await tracker.increment_and_check(str(uuid.uuid4()))
    finally:
        redis_client.connection_pool.get_connection = real  # type: ignore[method-assign]
    assert len(sent) == 1  # MULTI, INCR, EXPIRE, EXEC packed and sent together


async def test_bad_message_ids_are_refused(redis_client: aioredis.Redis) -> None:
    tracker = RetryTracker(redis_client)
    with pytest.raises(InvalidInputError, match="message id"):
        await tracker.increment_and_check("retry_count:*")


async def test_redis_down_falls_back_to_the_deliverys_own_count() -> None:
    dead = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    tracker = RetryTracker(dead, max_retries=3)
    message_id = str(uuid.uuid4())
    assert not await tracker.increment_and_check(message_id, fallback_count=2)  # 3rd failure
    assert await tracker.increment_and_check(message_id, fallback_count=3)  # 4th: to the DLQ
    with pytest.raises(ServiceUnavailableError):
        await tracker.increment_and_check(message_id)  # no fallback: say so, never guess
    await dead.aclose()


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_retries must be >= 0"):
        RetryTracker(None, max_retries=-1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ttl must be > 0"):
        RetryTracker(None, ttl=0)  # type: ignore[arg-type]


def test_deferrals_do_not_lengthen_the_backoff_of_a_later_failure() -> None:
    """Celery's request.retries counts deferrals too; the backoff must count failures."""
    from structlog.testing import capture_logs

    from aura.config import load_settings
    from aura.messaging import resilient_task
    from aura.worker.celery_app import make_celery_app

    app = make_celery_app(load_settings())  # in-memory broker; eager: retries run inline
    app.conf.task_always_eager = True
    runs: list[int] = []

    @resilient_task(app=app, name="tests.defer_then_fail", backoff_base=8.0, backoff_max=60.0)
    def defer_then_fail(self: object) -> str:
        runs.append(1)
        if len(runs) <= 4:
            raise CircuitOpenError("llm", retry_after=0.0)
        if len(runs) == 5:
            raise ConnectionError("connection reset")
        return "done"

    with capture_logs() as logs:
        assert defer_then_fail.apply().get() == "done"
    retried = [entry for entry in logs if entry["event"] == "task failed; retrying"]
    assert [entry["attempt"] for entry in retried] == [1]
    assert 4.0 <= retried[0]["countdown"] <= 8.0  # the first failure's delay, not the 5th's


def test_reading_the_in_memory_dlq_leaves_it_whole() -> None:
    """kombu's memory transport drops unacked messages on close; the reader puts them back."""
    import asyncio

    from aura.config import load_settings
    from aura.messaging import DeadLetterQueue, route_to_dlq
    from aura.messaging.dlq import purge
    from aura.worker.celery_app import make_celery_app

    app = make_celery_app(load_settings())
    ids = [f"memory-{uuid.uuid4()}" for _ in range(3)]
    with app.connection_for_write() as connection:
        purge(DeadLetterQueue(connection), reason="poison_pill")
        for message_id in ids:
            asyncio.run(route_to_dlq(message_id, "poison_pill", connection=connection, task="t"))
    for _ in range(2):
        with app.connection_for_write() as connection:
            listed = DeadLetterQueue(connection).list(limit=1000)
            assert [x.message_id for x in listed if x.message_id in ids] == ids
