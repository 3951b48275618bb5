"""The API gateway: tenants' products and catalog imports in, enrichment state out.

    POST /v1/tenants/{tenant_id}/products          one product, validated, written in one
                                                   transaction, enrichment queued -> 201
    GET  /v1/tenants/{tenant_id}/products          a page (limit <= 100, offset)
    GET  /v1/tenants/{tenant_id}/products/{id}     with its enrichment state
    POST /v1/tenants/{tenant_id}/imports           JSON array or JSON lines; each record
                                                   one message on bulk_queue, as it came -> 202
    GET  /v1/tenants/{tenant_id}/imports/{id}      accepted, done, dead_lettered, pending
    GET  /healthz  /readyz  /metrics

Every tenant route needs ``X-API-Key``; a key sees only its own tenant (anything else is
404). Bad input is a 4xx whose JSON names the field; nothing is half-written.

Built of: one router per resource (``aura.gateway.routes``), one table from error to
status (``aura.gateway.errors``), the lifespan (``aura.gateway.lifespan``), and the
state and authorization as FastAPI dependencies (``aura.gateway.state``). Each request is
a SERVER span when tracing is on (FastAPI's own instrumentation; ``aura.tracing``).

Messages go through the outbox (``aura.db._outbox``): the product or the import's records
and the messages they need are committed together, then published; if the broker is
down the request still succeeds and the relay (every OUTBOX_RELAY_INTERVAL seconds)
publishes what was left. While the broker blocks publishing (a resource alarm) new
writes are 503 with Retry-After and ``/readyz`` says the broker is blocked; writes already
committed are answered at once and published when the alarm clears.
"""

from __future__ import annotations

import functools

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig

from aura import __version__, tracing
from aura.config import Settings, get_settings
from aura.gateway.authn import Authenticator
from aura.gateway.bodies import MAX_IMPORT_BYTES, MAX_IMPORT_RECORDS, MAX_PRODUCT_BYTES
from aura.gateway.errors import install_error_handlers
from aura.gateway.guard import ErrorGuard, LoadShedder
from aura.gateway.lifespan import lifespan
from aura.gateway.openapi import build_openapi
from aura.gateway.request_context import RequestContext
from aura.gateway.routes import include_routes
from aura.gateway.state import Gateway

__all__ = ["MAX_IMPORT_BYTES", "MAX_IMPORT_RECORDS", "MAX_PRODUCT_BYTES", "Gateway", "create_app"]


def _writes_blocked(app: FastAPI) -> bool:
    gateway: Gateway | None = getattr(app.state, "gateway", None)
    return gateway is not None and gateway.broker_blocked()


_UNTRACED = frozenset({"/healthz", "/readyz", "/metrics"})


def _telemetry() -> TelemetryConfig:
    """FastAPI's own OpenTelemetry: a SERVER span per request (``traceparent`` read), in
    ``aura.tracing``'s provider when a test installed one, else the process-wide one
    (``configure_tracing``); no span per dependency, no probe or scrape spans, and no
    OpenTelemetry metrics or logs (Prometheus and structlog have them)."""
    return {
        "tracer_provider": tracing.tracer_provider(),
        "operation_spans": False,
        "metrics": False,
        "logs": False,
        "exclude": lambda scope: scope.get("path") in _UNTRACED,
    }


def create_app(gateway: Gateway | None = None, *, settings: Settings | None = None) -> FastAPI:
    """The FastAPI app; without ``gateway`` it builds one from Settings at start-up."""
    app = FastAPI(
        title="Aura gateway",
        version=__version__,
        lifespan=lifespan(gateway, settings),
        telemetry=_telemetry(),
    )
    app.openapi = functools.partial(build_openapi, app)  # type: ignore[method-assign]
    app.add_middleware(ErrorGuard)
    configured = settings or get_settings()
    if gateway is not None:
        limit, wait, share = gateway.max_in_flight, gateway.max_wait, gateway.tenant_share
    else:
        limit, wait = configured.gateway_max_in_flight, configured.gateway_max_wait
        share = configured.gateway_tenant_share
    # Wait or shed before anything else runs, but after authentication: a request with a
    # wrong key never takes a tenant's slot (aura.gateway.authn).
    app.add_middleware(
        LoadShedder,
        limit=limit,
        max_wait=wait,
        tenant_share=share,
        writes_blocked=functools.partial(_writes_blocked, app),
    )
    app.add_middleware(
        Authenticator, failures_per_second=configured.gateway_auth_failures_per_second
    )
    app.add_middleware(RequestContext)  # outermost: every line of a request has its id
    if gateway is not None:
        app.state.gateway = gateway
    install_error_handlers(app)
    include_routes(app)
    return app
