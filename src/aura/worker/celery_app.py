"""The Celery app: the seed's time limits, and what makes "nothing lost" true.

    task_soft_time_limit       CELERY_TASK_SOFT_TIME_LIMIT (45 s): the task is asked to stop
    task_time_limit            CELERY_TASK_HARD_TIME_LIMIT (60 s): its process is killed
    worker_max_tasks_per_child CELERY_WORKER_MAX_TASKS_PER_CHILD (1000)
    task_acks_late             ack after the task returns, so a crash redelivers
    task_reject_on_worker_lost a killed child's message goes back to the queue ...
    task_acks_on_failure_or_timeout=False  ... and so does one past the hard limit (Celery
                               acks those by default: the message would be lost)
    x-delivery-limit           ... at most RETRY_TRACKER_MAX_RETRIES + 1 deliveries, then
                               the broker dead-letters it (``worker_lost``)
    worker_prefetch_multiplier 1: a worker holds one message per task slot, no more
    worker_pool                WORKER_POOL: async (default; aura.messaging.pool.AsyncPool,
                               WORKER_CONCURRENCY tasks in flight on one event loop, with
                               per-task time limits) or prefork (one task per child)
    JSON only                  no pickle crosses the broker
    confirm_publish            every publish (tasks, retries, dead letters) is confirmed
    worker_consumer            aura.messaging.envelope:GuardedConsumer: whatever arrives on
                               a work queue ends in a task or the DLQ, never a crash
    worker_cancel_long_running_tasks_on_connection_loss=False  a lost broker connection
                               does not kill running tasks: they finish, their acks are
                               lost, and the redelivered twin meets the inbox (killing them
                               made a redelivery look like a dead worker: worker_lost)

Time limits work in the prefork pool (Celery's) and in the async pool (Aura's, per task);
Celery's threads, gevent and eventlet pools have none.

``celery_app`` is built on first access (module ``__getattr__``), from Settings, so
importing this module reads no environment.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

from celery import Celery, signals

from aura.config import Settings, get_settings
from aura.messaging.topology import (
    REALTIME_QUEUE,
    WORK_EXCHANGE,
    dead_letter_queue,
    work_queues,
)

__all__ = ["ASYNC_POOL", "celery_app", "declare_topology", "make_celery_app"]  # noqa: F822 - celery_app comes from __getattr__


ASYNC_POOL = "aura.messaging.pool:AsyncPool"


def make_celery_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("aura", broker=settings.celery_broker_url or "memory://", set_as_current=True)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_soft_time_limit=settings.celery_task_soft_time_limit,
        task_time_limit=settings.celery_task_hard_time_limit,
        worker_max_tasks_per_child=settings.celery_worker_max_tasks_per_child,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A failure or a hard timeout is rejected, not acked: the broker dead-letters it
        # (or redelivers a killed one) instead of dropping it.
        task_acks_on_failure_or_timeout=False,
        worker_prefetch_multiplier=1,
        worker_pool=ASYNC_POOL if settings.worker_pool == "async" else "prefork",
        worker_concurrency=settings.worker_concurrency if settings.worker_pool == "async" else None,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_consumer="aura.messaging.envelope:GuardedConsumer",
        broker_transport_options={"confirm_publish": True},
        broker_connection_retry_on_startup=True,
        task_publish_retry=True,
        task_queues=work_queues(),
        task_default_queue=REALTIME_QUEUE,
        task_default_exchange=WORK_EXCHANGE.name,
        task_default_exchange_type=WORK_EXCHANGE.type,
        task_default_routing_key=REALTIME_QUEUE,
        task_create_missing_queues=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )

    def declare_dead_letter_queue(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            declare_topology(app)

    signals.worker_init.connect(declare_dead_letter_queue, weak=False)
    # Celery warns at every connection loss that it will cancel tasks by default in 6.0;
    # this app chose not to, on purpose (see the module doc).
    warnings.filterwarnings("ignore", message=r"\s*In Celery 5\.1 we introduced", category=Warning)
    from aura.worker import observability

    observability.install(app, settings)
    return app


def declare_topology(app: Celery) -> None:
    """Declare the DLQ and its exchange (workers declare only the queues they consume)."""
    with app.connection_for_write() as connection:
        dead_letter_queue()(connection.default_channel).declare()


@functools.cache
def _default_app() -> Celery:
    return make_celery_app()


def __getattr__(name: str) -> Any:
    if name == "celery_app":
        return _default_app()
    raise AttributeError(name)
