"""Celery's native delayed delivery set-up, on the node the worker is connected to.

Retries with a countdown on quorum queues wait in RabbitMQ itself (kombu's
``celery_delayed_*`` exchanges and queues), which Celery's ``DelayedDelivery`` consumer
step declares each time the consumer (re)connects. Celery 5.7's step declares them on
*every* URL of a ``;``-separated broker list, retrying each three times a second apart,
before the consumer starts consuming. Given a cluster's node list with one node dead, a
worker that had already failed over to a live node processed nothing for ~18 s while the
step kept retrying the dead URL, and did it again at each reconnect.

A cluster shares its exchanges and queues: declaring them once, on any node, is enough.
``FailoverDelayedDelivery`` declares them on the node the consumer is connected to (it
just answered), once; only if that fails does it try the other nodes of the list, each
once. A set-up that fails everywhere is logged, as Celery's is, and the worker consumes
on: retries with a countdown then fail to route, and ``resilient_task`` dead-letters
them with a reason (nothing waits forever).
"""

from __future__ import annotations

from typing import Any

import structlog
from celery.worker.consumer.delayed_delivery import DelayedDelivery
from kombu.utils.url import maybe_sanitize_url

from aura.messaging.topology import broker_nodes

__all__ = ["FailoverDelayedDelivery", "failover_consumer_steps"]

_log = structlog.get_logger("aura.messaging.delayed_delivery")
_CELERY_STEP = "celery.worker.consumer.delayed_delivery:DelayedDelivery"
_OUR_STEP = "aura.messaging._delayed_delivery:FailoverDelayedDelivery"


class FailoverDelayedDelivery(DelayedDelivery):  # type: ignore[misc]
    """Celery's step, declared once on the consumer's own node (see the module)."""

    def start(self, c: Any) -> None:
        app = c.app
        self._validate_configuration(app)  # a bad configuration still stops the worker
        for url in _nodes_in_order(c):
            try:
                self._setup_delayed_delivery(c, url)
            except Exception as exc:  # that node could not: the next may
                _log.warning(
                    "delayed delivery set-up failed on a broker node; trying the next",
                    node=maybe_sanitize_url(url),
                    error=type(exc).__name__,
                )
                continue
            return
        _log.critical(
            "delayed delivery could not be set up on any broker node: retries with a "
            "countdown are dead-lettered until a worker reconnects"
        )


def _nodes_in_order(c: Any) -> list[str]:
    """The consumer's own node first, then the rest of the broker list, each once."""
    urls = broker_nodes(c.app.conf.broker_url)
    connection = getattr(c, "connection", None)
    if connection is not None:
        try:
            current = connection.as_uri(include_password=True)
        except Exception:  # no URL to give: the list alone
            current = None
        if current:
            urls = [current, *(url for url in urls if url != current)]
    return list(dict.fromkeys(urls))


def failover_consumer_steps(steps: list[str]) -> list[str]:
    """A consumer blueprint's default steps with Celery's delayed delivery step replaced."""
    return [_OUR_STEP if step == _CELERY_STEP else step for step in steps]
