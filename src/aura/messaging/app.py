"""``configure(app)``: Aura's settings, queues and dead-letter topology on a Celery app.

Your own app, with your own queue names::

    from celery import Celery
    from aura.messaging import configure, resilient_task

    app = Celery("shop", broker="amqp://guest:guest@localhost//")
    configure(app, queues=["orders", "emails"])

    @resilient_task(queue="orders")
    async def place_order(self, order_id: str) -> None: ...

and ``celery -A shop worker -Q orders,emails``. What it sets (the seed's pattern 6 and
what makes "nothing lost" true):

    task_soft_time_limit       CELERY_TASK_SOFT_TIME_LIMIT (45 s): the task is asked to stop
    task_time_limit            CELERY_TASK_HARD_TIME_LIMIT (60 s): its process is killed
    worker_max_tasks_per_child CELERY_WORKER_MAX_TASKS_PER_CHILD (1000)
    task_acks_late             ack after the task returns, so a crash redelivers
    task_reject_on_worker_lost a killed child's message goes back to the queue ...
    task_acks_on_failure_or_timeout=False  ... and so does one past the hard limit (Celery
                               acks those by default: the message would be lost)
    task_queues                your queues, as quorum queues with x-delivery-limit 10 (a
                               constant: see aura.messaging.topology) dead-lettering into
                               ``aura.dlq``, declared with the DLQ when a worker starts
    worker_prefetch_multiplier 1: a worker holds one message per task slot, no more
    worker_pool                WORKER_POOL: async (default; aura.messaging.pool.AsyncPool,
                               WORKER_CONCURRENCY tasks in flight on one event loop, with
                               per-task time limits) or prefork (one task per child); a
                               worker's ``-P``/``--pool`` wins (``-P prefork`` included)
    aura_tenant_weights        TENANT_WEIGHTS: the async pool's share of slots per tenant
    aura_priority_queues       ``priority_queues`` (none unless given): the async pool's
                               free slots go to their tasks first
    JSON only                  no pickle crosses the broker
    confirm_publish            every publish (tasks, retries, dead letters) is confirmed
    worker_consumer            aura.messaging.envelope:GuardedConsumer: whatever arrives on
                               a work queue ends in a task or the DLQ, never a crash
    worker_cancel_long_running_tasks_on_connection_loss=False  a lost broker connection
                               does not kill running tasks: they finish, their acks are
                               lost, and the redelivered twin meets the inbox

The broker URL is yours: ``configure`` sets it from CELERY_BROKER_URL only when the app
has none. It also connects the worker's metrics endpoint (WORKER_METRICS_PORT), the
queue-depth poller (``aura.messaging._observability``) and tracing when OTEL_* asks for it
(``aura.tracing``: a span per task run, its fate as attributes), and makes the app the default
of ``@resilient_task`` (the last app configured wins; ``resilient_task(app=...)`` picks
another).
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from celery import Celery, signals

from aura import tracing
from aura.config import Settings, get_settings
from aura.errors import ConfigurationError
from aura.messaging.topology import WORK_EXCHANGE, work_queues
from aura.process_args import pool_on_the_command_line

__all__ = [
    "ASYNC_POOL",
    "check_database",
    "configure",
    "configured_app",
    "declare_topology",
    "default_app",
    "pool_on_the_command_line",
]

ASYNC_POOL = "aura.messaging.pool:AsyncPool"

_default: Celery | None = None


def configure(
    app: Celery,
    *,
    queues: Sequence[str],
    default_queue: str | None = None,
    priority_queues: Sequence[str] = (),
    settings: Settings | None = None,
    make_default: bool = True,
) -> Celery:
    """Put Aura's settings, ``queues`` and the DLQ topology on ``app``; return ``app``.

    ``queues`` are the app's own (no default: an app never gets another's queues).
    ``default_queue`` (the first of ``queues`` unless given) is where a task without a
    ``queue`` goes. The async pool gives a free slot to the tasks of ``priority_queues``
    (those of ``queues``) before the others' (``aura.messaging.pool``). With
    ``make_default`` the app becomes ``@resilient_task``'s default.
    Anything you set on ``app.conf`` afterwards wins over what this sets."""
    global _default
    settings = settings or _settings_or_exit()
    names = _queue_names(queues, default_queue)
    default_queue = default_queue or names[0]
    if not app.conf.broker_url and settings.celery_broker_url:
        app.conf.broker_url = settings.celery_broker_url
    async_pool = _async_pool_chosen(settings)
    app.conf.update(
        **_delivery_conf(settings, async_pool),
        task_queues=work_queues(names),
        task_default_queue=default_queue,
        task_default_exchange=WORK_EXCHANGE.name,
        task_default_exchange_type=WORK_EXCHANGE.type,
        task_default_routing_key=default_queue,
        task_create_missing_queues=False,
        aura_priority_queues=[name for name in names if name in priority_queues],
        aura_tenant_weights=settings.weights_by_tenant,
    )
    _connect_signals(app, settings)
    from aura.messaging import _observability as observability

    observability.install(app, settings)
    if make_default:
        _default = app
    return app


def _queue_names(queues: Sequence[str], default_queue: str | None) -> list[str]:
    if isinstance(queues, str):  # configure(app, queues="orders"): one queue, not 6
        queues = [queues]
    names = list(dict.fromkeys(queues))
    if not names:
        raise ConfigurationError("configure(app, queues=...) needs at least one queue name")
    if default_queue is not None and default_queue not in names:
        raise ConfigurationError(f"default_queue {default_queue!r} is not one of {names}")
    return names


def _async_pool_chosen(settings: Settings) -> bool:
    """WORKER_POOL, unless the command line names a pool (``-P prefork`` wins); the async
    pool with ``--autoscale`` is refused, never silently ignored (its slots are its
    concurrency)."""
    named = pool_on_the_command_line(sys.argv)
    async_pool = named in ("async", ASYNC_POOL) if named else settings.worker_pool == "async"
    if (
        async_pool
        and "worker" in sys.argv
        and any(argument.startswith("--autoscale") for argument in sys.argv)
    ):
        print(
            "aura: --autoscale needs a pool of processes (-P prefork); the async pool holds "
            "-c tasks in flight in one process",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return async_pool


def _delivery_conf(settings: Settings, async_pool: bool) -> dict[str, Any]:
    """What makes "nothing lost" true on any app (see the module doc's table)."""
    return {
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        "task_soft_time_limit": settings.celery_task_soft_time_limit,
        "task_time_limit": settings.celery_task_hard_time_limit,
        "worker_max_tasks_per_child": settings.celery_worker_max_tasks_per_child,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A failure or a hard timeout is rejected, not acked: the broker dead-letters it
        # (or redelivers a killed one) instead of dropping it.
        "task_acks_on_failure_or_timeout": False,
        "worker_prefetch_multiplier": 1,
        "worker_pool": ASYNC_POOL if async_pool else "prefork",
        "worker_concurrency": settings.worker_concurrency if async_pool else None,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_consumer": "aura.messaging.envelope:GuardedConsumer",
        "broker_transport_options": {"confirm_publish": True},
        "broker_connection_retry_on_startup": True,
        "task_publish_retry": True,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
    }


def _connect_signals(app: Celery, settings: Settings) -> None:
    def declare_dead_letter_queue(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            declare_topology(app)
            check_database(settings)

    signals.worker_init.connect(declare_dead_letter_queue, weak=False)
    # Tracing, if OTEL_* asks for it (aura.tracing): in the worker before any task runs,
    # and in each prefork child (a no-op where the parent already did it).
    signals.worker_init.connect(_start_tracing, weak=False, dispatch_uid="aura.tracing")
    signals.worker_process_init.connect(
        _start_tracing, weak=False, dispatch_uid="aura.tracing.child"
    )
    # One log stream: Celery's lines and Aura's in LOG_FORMAT (a receiver here, and
    # Celery neither configures logging nor redirects stdout into its own format).
    signals.setup_logging.connect(_one_log_stream, weak=False, dispatch_uid="aura.logs")
    # Celery warns at every connection loss that it will cancel tasks by default in 6.0;
    # Aura chose not to, on purpose (see the module doc).
    warnings.filterwarnings("ignore", message=r"\s*In Celery 5\.1 we introduced", category=Warning)


WORKER_SERVICE_NAME = "aura-worker"  # its traces' service.name, unless OTEL_SERVICE_NAME says


def _start_tracing(**_: Any) -> None:
    tracing.configure_tracing(WORKER_SERVICE_NAME, celery=True)


def check_database(settings: Settings, timeout: float = 5.0) -> bool:
    """At a worker's start: can ``DATABASE_URL`` (when set) be reached? If not, one ERROR
    line that says so, with the address (password masked) and the driver's reason: a
    wrong address used to surface only as each message's deferrals. The worker still
    starts (the database may come up later; deliveries that need it are put off)."""
    if settings.database_url is None:
        return True
    import structlog

    from aura.config import mask_url
    from aura.db import describe_error, reach
    from aura.messaging._bounded import run_in_own_loop

    try:
        run_in_own_loop(lambda: reach(settings, timeout), name="aura-db-check", timeout=timeout + 1)
    except Exception as exc:
        structlog.get_logger("aura.messaging").error(
            f"DATABASE_URL {mask_url(settings.database_url)} cannot be reached: "
            f"{describe_error(exc)}; deliveries that need it are put off until it answers",
        )
        return False
    return True


def declare_topology(app: Celery) -> None:
    """Declare the DLQ and its exchange, and every queue of the app (with its exchange and
    binding), whichever queues this worker consumes: Celery's native delayed delivery binds
    all of the app's queues at start-up, and one never declared on the vhost made it log a
    binding ERROR and CRITICAL "Native delayed delivery will not be available" (a
    countdown retry then had no way back to its queue)."""
    from aura.messaging.topology import dead_letter_queue

    with app.connection_for_write() as connection:
        channel = connection.default_channel
        dead_letter_queue()(channel).declare()
        for queue in app.conf.task_queues or ():
            queue(channel).declare()


def _one_log_stream(loglevel: Any = None, **_: Any) -> None:
    """Celery's ``setup_logging``: Aura's structured logging for every line of the worker,
    Celery's own included, in LOG_FORMAT (JSON when asked), at the worker's ``-l`` level.
    Without it Celery wrapped each of Aura's lines in its own format (two timestamps, two
    levels that disagreed) and LOG_FORMAT changed nothing."""
    import logging

    from aura.logs import configure_logging, logging_configured

    if logging_configured():  # the app (or ``aura worker``) set it up already: it stands
        return
    settings = get_settings()
    named = logging.getLevelName(loglevel) if isinstance(loglevel, int) else None
    level = named if named in logging.getLevelNamesMapping() else settings.log_level
    configure_logging(level, settings.log_format)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a finder that refuses it: as good as not installed
        return False


def _settings_or_exit() -> Settings:
    """The settings; under ``celery ... worker`` a bad one is one line and exit 2 (it was a
    37-line traceback out of the app's import), elsewhere the error is raised. So is a
    worker without REDIS_URL on a core install (its in-process stand-in is the demo
    extra's: Celery's fakeredis traceback, seen)."""
    try:
        settings = get_settings()
        worker = "worker" in sys.argv
        if worker and settings.redis_url is None and not _installed("fakeredis"):
            raise ConfigurationError(
                "REDIS_URL is not set, and its in-process stand-in needs "
                "aura-platform[demo]: set REDIS_URL"
            )
    except ConfigurationError as exc:
        if "worker" not in sys.argv:
            raise
        print(f"aura: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return settings


def configured_app() -> Celery | None:
    """The app ``configure`` last made the default, if any."""
    return _default


def default_app() -> Celery:
    """``@resilient_task``'s app when none is given: the last one ``configure``d."""
    if _default is None:
        raise ConfigurationError(
            "no Celery app for @resilient_task: call aura.messaging.configure(app) before "
            "the tasks are defined, or pass resilient_task(app=...)"
        )
    return _default
