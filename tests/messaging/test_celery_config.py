"""The Celery app's configuration, and the backoff schedule, checked exactly."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aura.config import Settings
from aura.messaging import backoff_delay
from aura.messaging.topology import BROKER_DELIVERY_LIMIT
from aura.worker.celery_app import make_celery_app


def test_the_seeds_limits_and_the_nothing_lost_settings() -> None:
    conf = make_celery_app(Settings()).conf
    assert conf.task_soft_time_limit == 45
    assert conf.task_time_limit == 60
    assert conf.worker_max_tasks_per_child == 1000
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.task_acks_on_failure_or_timeout is False
    assert conf.worker_prefetch_multiplier == 1
    assert conf.accept_content == ["json"]
    assert conf.task_serializer == "json"
    assert conf.broker_transport_options["confirm_publish"] is True
    queues = {queue.name: queue for queue in conf.task_queues}
    assert set(queues) == {"realtime_queue", "bulk_queue"}
    for queue in queues.values():
        assert queue.durable
        assert queue.queue_arguments["x-queue-type"] == "quorum"
        assert queue.queue_arguments["x-delivery-limit"] == BROKER_DELIVERY_LIMIT
        assert queue.queue_arguments["x-dead-letter-strategy"] == "at-least-once"
        assert queue.exchange.type == "topic"  # what native delayed delivery needs


def test_settings_scale_the_limits() -> None:
    settings = Settings(
        celery_task_soft_time_limit=0.5,
        celery_task_hard_time_limit=1.5,
        retry_tracker_max_retries=5,
        celery_worker_max_tasks_per_child=10,
    )
    conf = make_celery_app(settings).conf
    assert (conf.task_soft_time_limit, conf.task_time_limit) == (0.5, 1.5)
    assert conf.worker_max_tasks_per_child == 10
    # Queue arguments never follow a setting: RabbitMQ would refuse the changed queue.
    assert all(
        q.queue_arguments["x-delivery-limit"] == BROKER_DELIVERY_LIMIT for q in conf.task_queues
    )


@pytest.mark.parametrize(
    ("attempt", "low", "high"),
    [(1, 0.5, 1.0), (2, 1.0, 2.0), (3, 2.0, 4.0), (4, 4.0, 8.0), (10, 30.0, 60.0)],
)
def test_backoff_doubles_and_is_capped(attempt: int, low: float, high: float) -> None:
    rng = random.Random(7)
    for _ in range(50):
        assert low <= backoff_delay(attempt, base=1.0, cap=60.0, rng=rng) <= high


@given(
    attempt=st.integers(min_value=1, max_value=100_000),
    base=st.floats(min_value=0.01, max_value=10),
    cap=st.floats(min_value=0.01, max_value=600),
    seed=st.integers(),
)
def test_backoff_is_bounded_for_any_attempt(
    attempt: int, base: float, cap: float, seed: int
) -> None:
    delay = backoff_delay(attempt, base=base, cap=cap, rng=random.Random(seed))
    assert 0 < delay <= min(cap, base * 2.0 ** min(attempt - 1, 64)) + 1e-9


def test_adding_a_queue_is_naming_it_in_configure() -> None:
    """An app's queues are its own (no default): a new one is one name in one call, and it
    gets the same quorum, delivery-limit and DLQ arguments as every other."""
    from celery import Celery

    from aura.messaging import configure

    app = configure(
        Celery("shop"),
        queues=["orders", "mail", "refunds"],
        settings=Settings(),
        make_default=False,
    )
    queues = {queue.name: queue for queue in app.conf.task_queues}
    assert list(queues) == ["orders", "mail", "refunds"]
    assert app.conf.task_default_queue == "orders"
    assert app.conf.aura_priority_queues == []  # no platform queue is anyone's default
    assert queues["refunds"].queue_arguments == queues["orders"].queue_arguments
    assert queues["refunds"].queue_arguments["x-dead-letter-routing-key"] == "aura.dlq"
    single = configure(Celery("one"), queues="orders", settings=Settings(), make_default=False)
    assert [queue.name for queue in single.conf.task_queues] == ["orders"]
    with pytest.raises(TypeError):
        configure(Celery("none"), settings=Settings(), make_default=False)  # type: ignore[call-arg]
