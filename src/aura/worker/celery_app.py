"""The platform's Celery app: ``aura.messaging.configure`` on a Celery app named
``aura.contract.APP_NAME`` with the platform's work queues (``PLATFORM_QUEUES``; see that
module for every setting it makes and why).

Time limits work in the prefork pool (Celery's) and in the async pool (Aura's, per task);
Celery's threads, gevent and eventlet pools have none.

``celery_app`` is built on first access (module ``__getattr__``), from Settings, so
importing this module reads no environment.
"""

from __future__ import annotations

import functools
from typing import Any

from celery import Celery

from aura.config import Settings, get_settings
from aura.contract import APP_NAME, PLATFORM_QUEUES, REALTIME_QUEUE
from aura.messaging.app import ASYNC_POOL, configure, declare_topology

__all__ = ["ASYNC_POOL", "celery_app", "declare_topology", "make_celery_app"]  # noqa: F822 - celery_app comes from __getattr__


def make_celery_app(settings: Settings | None = None, *, make_default: bool = False) -> Celery:
    """A new platform app (a publisher, or a test's worker); ``celery_app`` is the one
    ``@resilient_task`` uses by default."""
    settings = settings or get_settings()
    app = Celery(APP_NAME, broker=settings.celery_broker_url or "memory://", set_as_current=True)
    return configure(
        app,
        queues=PLATFORM_QUEUES,
        # TENANT_SCHEDULING=fair: the gateways' dispatcher keeps ingests from running ahead
        # of enrichments, so the pool needs no realtime-first rule; with it, bulk tasks a
        # worker had prefetched waited up to aura_priority_max_wait (5 s) behind its
        # realtime ones, and a small tenant's ingest, still at the broker behind them,
        # waited as long (7.3 s at 20,000 records). fifo: realtime first, as before.
        priority_queues=(REALTIME_QUEUE,) if settings.tenant_scheduling == "fifo" else (),
        settings=settings,
        make_default=make_default,
    )


@functools.cache
def _default_app() -> Celery:
    return make_celery_app(make_default=True)


def __getattr__(name: str) -> Any:
    if name == "celery_app":
        return _default_app()
    raise AttributeError(name)
