"""The app's lifespan: the ``Gateway`` it serves, built from Settings at start-up (or
given, by a test), and what runs beside the requests until shutdown.

From Settings: the database pool, a publisher configured as the worker's app is
(``aura.contract``: the same name, queues and serializers; the gateway does not import
the worker), an ``AmqpSender`` (the gateway refuses to start without RabbitMQ), the
readiness checks, the outbox relay (every OUTBOX_RELAY_INTERVAL seconds) and the fair
dispatcher of held imports (``aura.gateway.dispatch``). Tracing is configured first, if the
environment asks for it (``aura.tracing``). At shutdown they stop, the
publishes in flight finish (or are the relay's), the pool closes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from celery import Celery
from fastapi import FastAPI

from aura import tracing
from aura.config import Settings, get_settings
from aura.contract import APP_NAME, PLATFORM_QUEUES
from aura.db import Database
from aura.gateway.readiness import default_checks
from aura.gateway.relay import relay_forever
from aura.gateway.senders import AmqpSender
from aura.gateway.state import Gateway
from aura.messaging import configure

__all__ = ["SERVICE_NAME", "gateway_from_settings", "lifespan", "make_publisher"]

SERVICE_NAME = "aura-gateway"  # its traces' service.name, unless OTEL_SERVICE_NAME says


def make_publisher(settings: Settings) -> Celery:
    """The Celery app the gateway publishes with, configured as the worker's is."""
    app = Celery(APP_NAME, broker=settings.celery_broker_url or "memory://")
    return configure(
        app,
        queues=PLATFORM_QUEUES,
        settings=settings,
        make_default=False,
    )


def gateway_from_settings(settings: Settings) -> Gateway:
    publisher = make_publisher(settings)
    checks = default_checks(settings)
    checks.pop("broker", None)  # the publisher's own probe answers for the broker
    return Gateway(
        Database.from_settings(settings),
        publisher,
        checks,
        outbox_lease=settings.outbox_relay_min_age,
        max_in_flight=settings.gateway_max_in_flight,
        max_wait=settings.gateway_max_wait,
        tenant_share=settings.gateway_tenant_share,
        import_max_records=settings.import_max_records,
        import_max_bytes=settings.import_max_bytes,
        sender=AmqpSender(publisher),
        scheduling=settings.tenant_scheduling,
        dispatch_depth=settings.outbox_dispatch_depth,
        dispatch_interval=settings.outbox_dispatch_interval,
        tenant_weights=settings.weights_by_tenant,
    )


def lifespan(
    gateway: Gateway | None, settings: Settings | None
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The app's lifespan: ``gateway`` as given (its owner starts and stops what it
    needs), or one built from ``settings`` with its relay."""

    @asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        if gateway is not None:
            app.state.gateway = gateway
            yield
            return
        tracing.configure_tracing(SERVICE_NAME)  # before the engine: its statements too
        current = settings or get_settings()
        built = gateway_from_settings(current)
        app.state.gateway = built
        assert built.sender is not None
        relay = asyncio.create_task(
            relay_forever(
                built.database,
                built.sender,
                interval=current.outbox_relay_interval,
                min_age=current.outbox_relay_min_age,
            )
        )
        built.dispatcher.start()  # held rows of every gateway, a crashed one's included
        try:
            yield
        finally:
            relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relay
            await built.dispatcher.aclose()
            await built.outbox.aclose()
            await built.database.dispose()

    return run
