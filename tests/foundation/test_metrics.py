"""Metrics: the seed's names and labels, fed by instrumentation events through hooks."""

from __future__ import annotations

import structlog
import structlog.testing
from prometheus_client import REGISTRY, generate_latest

from aura import events
from aura.events import (
    CircuitBreakerOpened,
    DeadLetterReason,
    LLMOutcome,
    LLMRequestFinished,
    MessageDeadLettered,
    PoolConnectionsChanged,
    Queue,
    QueueDepthObserved,
    RollbackReason,
    TransactionRolledBack,
)
from aura.metrics import SEED_METRIC_NAMES


def sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    assert value is not None, f"no sample {name}{labels}"
    return value


def test_every_seed_metric_is_exposed_with_the_seeds_labels() -> None:
    from aura.worker.celery_app import make_celery_app

    make_celery_app()  # the platform's app: its queues' celery_tasks_pending series
    exposition = generate_latest(REGISTRY).decode()
    for name in SEED_METRIC_NAMES:
        assert f"# TYPE {name.removesuffix('_total')}" in exposition, name
    for line in (
        'database_transaction_rollbacks_total{reason="network_error"}',
        'messages_sent_to_dlq_total{reason="poison_pill"}',
        'messages_sent_to_dlq_total{reason="max_retries_exceeded"}',
        'celery_tasks_pending{queue="realtime_queue"}',
        'celery_tasks_pending{queue="bulk_queue"}',
        "llm_circuit_breaker_opens_total ",
        "sqlalchemy_pool_connections_active ",
    ):
        assert line in exposition, line


def test_events_move_their_metrics() -> None:
    before_rollbacks = sample("database_transaction_rollbacks_total", reason="network_error")
    before_dlq = sample("messages_sent_to_dlq_total", reason="poison_pill")
    before_opens = sample("llm_circuit_breaker_opens_total")
    before_pool = sample("sqlalchemy_pool_connections_active")
    before_count = sample("llm_api_request_duration_seconds_count", outcome="timeout")

    events.emit(TransactionRolledBack("create_product", RollbackReason.NETWORK_ERROR))
    events.emit(MessageDeadLettered(DeadLetterReason.POISON_PILL, "ingest_product"))
    events.emit(CircuitBreakerOpened("llm"))
    events.emit(PoolConnectionsChanged(+1))
    events.emit(LLMRequestFinished(LLMOutcome.TIMEOUT, 10.2))
    events.emit(QueueDepthObserved(Queue.BULK, 17))

    assert sample("database_transaction_rollbacks_total", reason="network_error") == (
        before_rollbacks + 1
    )
    assert sample("messages_sent_to_dlq_total", reason="poison_pill") == before_dlq + 1
    assert sample("llm_circuit_breaker_opens_total") == before_opens + 1
    assert sample("sqlalchemy_pool_connections_active") == before_pool + 1
    assert sample("llm_api_request_duration_seconds_count", outcome="timeout") == (before_count + 1)
    assert sample("celery_tasks_pending", queue="bulk_queue") == 17
    events.emit(PoolConnectionsChanged(-1))
    assert sample("sqlalchemy_pool_connections_active") == before_pool


def test_a_failing_hook_is_logged_and_never_breaks_the_caller() -> None:
    seen: list[events.Event] = []

    def broken(_: events.Event) -> None:
        raise RuntimeError("hook bug")

    before = sample("llm_circuit_breaker_opens_total")
    with (
        structlog.testing.capture_logs() as logged,
        events.temporary_hook(broken),
        events.temporary_hook(seen.append),
    ):
        events.emit(CircuitBreakerOpened("llm"))  # must not raise
    assert seen == [CircuitBreakerOpened("llm")]  # hooks after the broken one still ran
    assert sample("llm_circuit_breaker_opens_total") == before + 1
    assert broken not in events.hooks()
    # (structlog's own capture: caplog saw it only once another test set up logging)
    assert any(e["event"] == "instrumentation hook failed" for e in logged)


def test_label_values_come_from_fixed_sets() -> None:
    assert {r.value for r in DeadLetterReason} >= {"poison_pill", "max_retries_exceeded"}
    assert {q.value for q in Queue} == {"realtime_queue", "bulk_queue"}
    assert "network_error" in {r.value for r in RollbackReason}


def test_the_dlq_depth_and_a_users_queue_depth_are_gauges() -> None:
    from aura.events import DeadLetterDepthObserved

    events.emit(DeadLetterDepthObserved(5))
    events.emit(QueueDepthObserved("shop_orders", 3))
    assert sample("aura_dlq_messages") == 5
    assert sample("celery_tasks_pending", queue="shop_orders") == 3
    events.emit(DeadLetterDepthObserved(0))
    assert sample("aura_dlq_messages") == 0


def test_a_users_app_shows_its_own_queues_and_not_the_platforms() -> None:
    """``configure(app, queues=[...])`` shows the app's queues in celery_tasks_pending; the
    platform's realtime_queue and bulk_queue appear only where the platform runs."""
    import subprocess
    import sys

    script = (
        "from celery import Celery\n"
        "from aura.messaging import configure\n"
        "configure(Celery('shop'), queues=['shop_orders', 'shop_emails'])\n"
        "from prometheus_client import REGISTRY, generate_latest\n"
        "print(generate_latest(REGISTRY).decode())\n"
    )
    exposition = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert 'celery_tasks_pending{queue="shop_orders"} 0.0' in exposition
    assert 'celery_tasks_pending{queue="shop_emails"} 0.0' in exposition
    assert "realtime_queue" not in exposition
    assert "bulk_queue" not in exposition
