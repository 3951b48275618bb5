"""What the routes need (``Gateway``), and how they get it: FastAPI dependencies.

    gateway_of    the app's ``Gateway`` (``app.state.gateway``, set by the lifespan)
    authorize     that, once the request's ``X-API-Key`` is the tenant's: an unknown or
                  missing key is 401, another tenant's is 404 (a key sees only its own)
    Authorized    ``authorize`` as a parameter's type, for the read routes

The write routes call ``authorize`` themselves: they are served without FastAPI's
dependency solving (``aura.gateway.routes.dispatch_directly``).
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import structlog
from celery import Celery
from fastapi import Depends, Request
from sqlalchemy import text

from aura.contract import BULK_QUEUE, REALTIME_QUEUE
from aura.db import Database
from aura.errors import NotFoundError
from aura.gateway.auth import KeyCache
from aura.gateway.bodies import MAX_IMPORT_RECORDS, MAX_STREAMED_BYTES
from aura.gateway.dispatch import DEFAULT_DEPTH, DEFAULT_INTERVAL, Dispatcher
from aura.gateway.errors import Unauthorized
from aura.gateway.guard import (
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_WAIT,
    DEFAULT_TENANT_SHARE,
    TENANT_SCOPE_KEY,
)
from aura.gateway.outbox import DEFAULT_LEASE, OutboxPublisher
from aura.gateway.readiness import ReadinessProbe
from aura.gateway.senders import Sender, is_blocked, sender_for

__all__ = ["Authorized", "Current", "Gateway", "authorize", "gateway_of"]

# The publisher's probe connects at most once per readiness refresh; a node list whose
# nodes all hang costs each node its connect timeout, so the probe is bounded as a whole.
_PUBLISHER_PROBE_BOUND = 10.0


@dataclass
class Gateway:
    """What the routes need; tests build it with their own database and publisher."""

    database: Database
    publisher: Celery
    ready_checks: dict[str, Callable[[], Any]]
    # How long a request holds the outbox rows it staged before the relay may take them
    # (renewed while it publishes): OUTBOX_RELAY_MIN_AGE when built from Settings.
    outbox_lease: float = DEFAULT_LEASE
    # Tenant requests served at once; more are shed with 503 + Retry-After.
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    # How long one more may wait for a slot before it is shed (GATEWAY_MAX_WAIT).
    max_wait: float = DEFAULT_MAX_WAIT
    # The share of those slots one tenant may hold (GATEWAY_TENANT_SHARE).
    tenant_share: float = DEFAULT_TENANT_SHARE
    # IMPORT_MAX_RECORDS, IMPORT_MAX_BYTES (JSON lines; an array is at most MAX_IMPORT_BYTES).
    import_max_records: int = MAX_IMPORT_RECORDS
    import_max_bytes: int = MAX_STREAMED_BYTES
    keys: KeyCache = field(default_factory=KeyCache)
    # How messages reach the broker: Celery's send_task on ``publisher`` unless given
    # (``aura gateway`` gives an AmqpSender: a batch on the event loop, confirmed at once).
    sender: Sender | None = None
    # TENANT_SCHEDULING: "fair" holds imports for the dispatcher; "fifo" publishes them
    # at once. OUTBOX_DISPATCH_DEPTH / _INTERVAL and TENANT_WEIGHTS tune the dispatcher.
    scheduling: str = "fair"
    dispatch_depth: int = DEFAULT_DEPTH
    dispatch_interval: float = DEFAULT_INTERVAL
    tenant_weights: dict[str, float] = field(default_factory=dict)
    outbox: OutboxPublisher = field(init=False)
    dispatcher: Dispatcher = field(init=False)
    readiness: ReadinessProbe = field(init=False)

    def __post_init__(self) -> None:
        self.readiness = ReadinessProbe(
            functools.partial(_probe, self.database, self.ready_checks, self._publisher_probe)
        )
        self.outbox = OutboxPublisher(
            self.database,
            self.sender if self.sender is not None else sender_for(self.publisher),
            lease=self.outbox_lease,
        )
        self.dispatcher = Dispatcher(
            self.database,
            self.outbox.sender,
            depth=self.dispatch_depth,
            interval=self.dispatch_interval,
            weights=self.tenant_weights,
            feeds={BULK_QUEUE: REALTIME_QUEUE},  # an ingest queues an enrichment
            lease=self.outbox_lease,
        )

    @property
    def holds_imports(self) -> bool:
        """Imports wait in the outbox for the dispatcher (TENANT_SCHEDULING=fair)."""
        return self.scheduling == "fair"

    def broker_blocked(self) -> bool:
        """The broker blocks the gateway's publishing (a resource alarm)."""
        return is_blocked(self.outbox.sender)

    async def _publisher_probe(self) -> str | None:
        """The broker as the gateway's own publisher finds it: "ok", blocked by a
        resource alarm, or no node of its broker list takes a connection (another
        connection answering proves nothing about the one that publishes); None for a
        publisher that cannot be probed (the ready checks' answer stands)."""
        if self.broker_blocked():  # it answers, but takes no message
            return "blocked: a resource alarm; publishing waits until it clears"
        probe = getattr(self.outbox.sender, "probe", None)
        if probe is None:
            return None
        try:
            await asyncio.wait_for(probe(), _PUBLISHER_PROBE_BOUND)
        except Exception as exc:
            return getattr(self.outbox.sender, "problem", None) or (
                f"unavailable: {type(exc).__name__}"
            )
        return "ok"


async def _probe(
    database: Database,
    ready_checks: dict[str, Callable[[], Any]],
    publisher_probe: Callable[[], Awaitable[str | None]] | None = None,
) -> dict[str, str]:
    """One look at the database (a pooled connection), Redis and the broker, and at the
    gateway's own publisher (its problem, if any, is the broker's answer)."""
    checks: dict[str, str] = {}
    try:
        async with database.reader.connect() as connection:
            await connection.execute(text("select 1"))
        checks["database"] = "ok"
    except Exception as exc:  # report, never raise: this is the health answer
        checks["database"] = f"unavailable: {type(exc).__name__}"
    for name, check in ready_checks.items():
        try:
            await check()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"unavailable: {type(exc).__name__}"
    publisher = None if publisher_probe is None else await publisher_probe()
    if publisher is not None and (publisher != "ok" or "broker" not in checks):
        checks["broker"] = publisher  # not "ok": not ready to accept writes
    return checks


def gateway_of(request: Request) -> Gateway:
    found: Gateway = request.app.state.gateway
    return found


async def authorize(request: Request, tenant_id: uuid.UUID) -> Gateway:
    """The gateway, once the request's key is ``tenant_id``'s (see the module doc)."""
    gw = gateway_of(request)
    if request.scope.get(TENANT_SCOPE_KEY) == tenant_id:  # Authenticator checked it
        return gw
    key = request.headers.get("x-api-key")
    if not key:
        raise Unauthorized("missing X-API-Key header")
    owner = gw.keys.cached(key)
    if owner is None:
        async with gw.database.session() as session:
            owner = await gw.keys.tenant_for_key(session, key)
    if owner is None:
        raise Unauthorized("invalid API key")
    if owner != tenant_id:
        raise NotFoundError(f"unknown tenant {tenant_id}", field="tenant_id")
    structlog.contextvars.bind_contextvars(tenant=str(tenant_id))  # this request's lines
    return gw


Authorized = Annotated[Gateway, Depends(authorize)]
Current = Annotated[Gateway, Depends(gateway_of)]
