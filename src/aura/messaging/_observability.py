"""What a worker shows Prometheus: its metrics endpoint and the queues' depth.

Under prefork every child process counts into files in ``PROMETHEUS_MULTIPROC_DIR``
(prometheus_client's multiprocess mode); the main process serves their sum on
``WORKER_METRICS_PORT`` (9100 by default; 0: none; a port another worker on the host
holds is logged and skipped) and forgets a child's live gauges when it exits. A daemon
thread in the main process keeps ``celery_tasks_pending{queue}`` current for every queue
of the app's ``task_queues`` (the user's own queue names, after
``aura.messaging.configure``) and ``aura_dlq_messages`` for the DLQ (a passive declare
of each every ``WORKER_QUEUE_POLL_INTERVAL`` seconds).

Celery logs an ack or reject lost with the broker connection at CRITICAL, with a
traceback ("Couldn't ack ..."). It is not critical: the message comes back and the inbox
or the counters settle it. ``AckLossFilter`` turns those lines into one WARNING each,
without the traceback, and counts them (``aura_broker_ack_failures_total``).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import structlog
from billiard.exceptions import TimeLimitExceeded
from celery import Celery
from prometheus_client import start_http_server

from aura import events
from aura.config import Settings
from aura.events import (
    BrokerAckFailed,
    DeadLetterDepthObserved,
    Queue,
    QueueDepthObserved,
    TaskTimedOut,
    TimeoutKind,
)
from aura.messaging.topology import dead_letter_queue
from aura.metrics import expect_queues, exposition_registry

__all__ = ["AckLossFilter", "install", "serve_metrics"]

_log = structlog.get_logger("aura.messaging.observability")


def _label(name: str) -> Queue | str:
    try:
        return Queue(name)
    except ValueError:  # a user's own queue
        return name


def _poll_queues(app: Celery, settings: Settings, stop: threading.Event) -> None:
    queues = list(app.conf.task_queues or [])
    while not stop.wait(settings.worker_queue_poll_interval):
        try:
            with app.connection_for_read() as connection:
                channel = connection.default_channel
                for queue in queues:
                    declared = queue(channel).queue_declare(passive=True)
                    events.emit(QueueDepthObserved(_label(queue.name), declared.message_count))
                declared = dead_letter_queue()(channel).queue_declare(passive=True)
                events.emit(DeadLetterDepthObserved(declared.message_count))
        except Exception as exc:  # the broker is away: try again next round
            _log.warning("cannot read queue depths", error=f"{type(exc).__name__}: {exc}")


METRICS_PORTS_TRIED = 16


def serve_metrics(port: int, tries: int = METRICS_PORTS_TRIED) -> int | None:
    """Start the worker's /metrics on ``port``, or, where another worker on this host has
    it, on the next free one of ``tries`` ports (9100, 9101, ...; two workers on a host
    clashed on 9100 and the second had none); the port it took, logged, or None."""
    last: OSError | None = None
    for candidate in range(port, min(port + tries, 65536)):
        try:
            start_http_server(candidate, registry=exposition_registry())
        except OSError as exc:
            last = exc
            continue
        if candidate != port:
            _log.warning(
                "worker metrics endpoint on another port: the configured one is taken",
                configured=port,
                port=candidate,
            )
        return candidate
    _log.warning(
        "worker metrics endpoint not started: no free port",
        first=port,
        tried=tries,
        error=str(last),
    )
    return None


def _forks_children(worker: Any) -> bool:
    """Whether this worker runs its tasks in child processes (prefork)."""
    pool = getattr(worker, "pool_cls", None)
    name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    return "prefork" in str(name)


class AckLossFilter(logging.Filter):
    """Celery's "Couldn't ack/reject" CRITICAL lines: a WARNING, no traceback, counted."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.CRITICAL and str(record.msg).startswith(
            ("Couldn't ack", "Couldn't reject")
        ):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
            record.msg = f"{record.msg} (the message is redelivered)"
            events.emit(BrokerAckFailed())
        return True


_ACK_LOGGERS = ("celery.worker.request", "celery.worker.consumer.consumer", "kombu")


def install(app: Celery, settings: Settings) -> None:
    """Connect the worker signals that start the endpoint and the queue poller."""
    from celery import signals

    expect_queues(queue.name for queue in app.conf.task_queues or ())
    for name in _ACK_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, AckLossFilter) for f in logger.filters):
            logger.addFilter(AckLossFilter())

    stop = threading.Event()

    def on_ready(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app:
            return
        if settings.worker_metrics_port:
            serve_metrics(settings.worker_metrics_port)
        if settings.celery_broker_url and not settings.celery_broker_url.startswith("memory"):
            threading.Thread(
                target=_poll_queues, args=(app, settings, stop), name="queue-depth", daemon=True
            ).start()

    def on_shutdown(sender: Any = None, **_: Any) -> None:
        stop.set()

    def on_child_exit(pid: int | None = None, **_: Any) -> None:
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ and pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid)

    def on_failure(sender: Any = None, exception: BaseException | None = None, **_: Any) -> None:
        # A hard limit kills the child; Celery reports it here, in the main process.
        if isinstance(exception, TimeLimitExceeded) and getattr(sender, "app", None) is app:
            events.emit(TaskTimedOut(str(sender.name), TimeoutKind.HARD))

    def on_init(sender: Any = None, **_: Any) -> None:
        # Multiprocess metric files from an earlier run of this worker (a container that
        # restarted in the same pod keeps its emptyDir) would be summed in: start clean,
        # as prometheus_client asks, before any child is forked.
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if getattr(sender, "app", None) is not app:
            return
        if not directory and _forks_children(sender) and settings.worker_metrics_port:
            _log.error(  # one line at start-up, where the counts of every task would read 0
                "prefork pool without PROMETHEUS_MULTIPROC_DIR: what the child processes "
                "count (every task's metrics) never reaches /metrics; set it to an empty "
                "directory of this worker's own (prometheus_client's multiprocess mode)",
                port=settings.worker_metrics_port,
            )
        if directory and os.path.isdir(directory):
            mine = f"_{os.getpid()}.db"  # this process's own files are already open
            for stale in Path(directory).glob("*.db"):
                if not stale.name.endswith(mine):
                    stale.unlink(missing_ok=True)

    signals.worker_init.connect(on_init, weak=False)
    signals.task_failure.connect(on_failure, weak=False)
    signals.worker_ready.connect(on_ready, weak=False)
    signals.worker_shutdown.connect(on_shutdown, weak=False)
    signals.worker_process_shutdown.connect(on_child_exit, weak=False)
