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

Messages go through the outbox (``aura.db.outbox``): the product or the import's records
and the messages they need are committed together, then published; if the broker is
down the request still succeeds and the relay (every OUTBOX_RELAY_INTERVAL seconds)
publishes what was left. While the broker blocks publishing (a resource alarm) new
writes are 503 with Retry-After and ``/readyz`` says the broker is blocked; writes already
committed are answered at once and published when the alarm clears.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import structlog
from celery import Celery
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from aura import __version__
from aura.catalog import (
    Enrichment,
    Import,
    Product,
    ProductIn,
    Variant,
    add_import,
    add_import_records,
    create_import_with_messages,
    create_product_with_message,
    import_counts,
    parse_product,
)
from aura.config import Settings, get_settings
from aura.contract import (
    APP_NAME,
    BULK_QUEUE,
    ENRICH_TASK,
    INGEST_TASK,
    PLATFORM_QUEUES,
    REALTIME_QUEUE,
)
from aura.db import Database, transactional
from aura.db.outbox import Claim, Staged, extend_claim, stage_messages
from aura.errors import (
    AuraError,
    ConflictError,
    DatabaseTransactionError,
    InvalidInputError,
    NotFoundError,
    ServiceUnavailableError,
)
from aura.gateway.auth import KeyCache
from aura.gateway.authn import Authenticator
from aura.gateway.bodies import (
    JSON_TYPES,
    MAX_IMPORT_BYTES,
    MAX_IMPORT_RECORDS,
    MAX_PRODUCT_BYTES,
    MAX_STREAMED_BYTES,
    NDJSON_TYPES,
    BodyTooLarge,
    SpooledRecords,
    UnsupportedMediaType,
    media_type,
    product_document,
    read_body,
    split_import,
    spool_lines,
    unencoded,
)
from aura.gateway.guard import (
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_WAIT,
    DEFAULT_TENANT_SHARE,
    RETRY_AFTER_SECONDS,
    TENANT_SCOPE_KEY,
    ErrorGuard,
    LoadShedder,
    release_slot,
)
from aura.gateway.openapi import IMPORT_BODY, PRODUCT_BODY, build_openapi
from aura.gateway.outbox import DEFAULT_LEASE, OutboxPublisher, relay_forever, staging_lease
from aura.gateway.readiness import ReadinessProbe
from aura.gateway.request_context import RequestContext
from aura.gateway.schemas import (
    ERROR_RESPONSES,
    Health,
    ImportAccepted,
    ImportCounts,
    ProductOut,
    ProductPage,
    Readiness,
    error_responses,
)
from aura.gateway.senders import AmqpSender, Sender, is_blocked, sender_for
from aura.logs import describe_exception
from aura.messaging import configure
from aura.metrics import exposition_registry

__all__ = [
    "MAX_IMPORT_BYTES",
    "MAX_IMPORT_RECORDS",
    "MAX_PRODUCT_BYTES",
    "Gateway",
    "create_app",
]

_CENTS = Decimal("0.01")
_PART = 1000  # import records written per statement
_PUBLISHED_INLINE = 500  # an import this small is published from memory, in the request
_log = structlog.get_logger("aura.gateway")


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
    outbox: OutboxPublisher = field(init=False)
    readiness: ReadinessProbe = field(init=False)

    def __post_init__(self) -> None:
        self.readiness = ReadinessProbe(
            functools.partial(_probe, self.database, self.ready_checks, self.broker_blocked)
        )
        self.outbox = OutboxPublisher(
            self.database,
            self.sender if self.sender is not None else sender_for(self.publisher),
            lease=self.outbox_lease,
        )

    def broker_blocked(self) -> bool:
        """The broker blocks the gateway's publishing (a resource alarm)."""
        return is_blocked(self.outbox.sender)


def make_publisher(settings: Settings) -> Celery:
    """The Celery app the gateway publishes with: configured as the worker's is (the
    same name, queues, serializer and compression: ``aura.contract``), not imported from
    the worker."""
    app = Celery(APP_NAME, broker=settings.celery_broker_url or "memory://")
    return configure(app, queues=PLATFORM_QUEUES, settings=settings, make_default=False)


def _writes_blocked(app: FastAPI) -> bool:
    gateway: Gateway | None = getattr(app.state, "gateway", None)
    return gateway is not None and gateway.broker_blocked()


async def _probe(
    database: Database,
    ready_checks: dict[str, Callable[[], Any]],
    broker_blocked: Callable[[], bool] = lambda: False,
) -> dict[str, str]:
    """One look at the database (a pooled connection), Redis and the broker."""
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
    if broker_blocked():  # it answers, but takes no message: not ready to accept writes
        checks["broker"] = "blocked: a resource alarm; publishing waits until it clears"
    return checks


def _error(
    status: int,
    code: str,
    message: str,
    fields: list[dict[str, str]] | None = None,
    *,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if fields:
        body["fields"] = fields
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _allowed_methods(app: FastAPI, path: str) -> set[str]:
    """Every method some route serves at ``path`` (Starlette names only the first route's)."""
    methods: set[str] = set()
    for route in app.routes:
        if isinstance(route, APIRoute | Route) and route.path_regex.match(path):
            methods |= route.methods or set()
    return methods


def _product_view(
    product: Product, variants: list[Variant], enrichment: Enrichment | None
) -> dict[str, Any]:
    return {
        "id": str(product.id),
        "tenant_id": str(product.tenant_id),
        "title": product.title,
        "description": product.description,
        "brand": product.brand,
        "category": product.category,
        "created_at": product.created_at.isoformat(),
        "variants": [
            {
                "sku": v.sku,
                "price": str(v.price),
                "currency": v.currency,
                "attributes": v.attributes,
            }
            for v in variants
        ],
        "enrichment": {"state": "pending"}
        if enrichment is None
        else {"state": "done", "description": enrichment.description, "tags": enrichment.tags},
    }


def create_app(gateway: Gateway | None = None, *, settings: Settings | None = None) -> FastAPI:
    """The FastAPI app; without ``gateway`` it builds one from Settings at start-up."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if gateway is not None:
            app.state.gateway = gateway
            yield
            return
        from aura.gateway.readiness import default_checks

        current = settings or get_settings()
        database = Database.from_settings(current)
        publisher = make_publisher(current)
        sender = AmqpSender(publisher)  # the gateway refuses to start without RabbitMQ
        built = Gateway(
            database,
            publisher,
            default_checks(current),
            outbox_lease=current.outbox_relay_min_age,
            max_in_flight=current.gateway_max_in_flight,
            max_wait=current.gateway_max_wait,
            tenant_share=current.gateway_tenant_share,
            import_max_records=current.import_max_records,
            import_max_bytes=current.import_max_bytes,
            sender=sender,
        )
        app.state.gateway = built
        relay = asyncio.create_task(
            relay_forever(
                database,
                sender,
                interval=current.outbox_relay_interval,
                min_age=current.outbox_relay_min_age,
            )
        )
        try:
            yield
        finally:
            relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relay
            await built.outbox.aclose()
            await database.dispose()

    app = FastAPI(title="Aura gateway", version=__version__, lifespan=lifespan)
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

    @app.exception_handler(AuraError)
    async def aura_error(_: Request, exc: AuraError) -> JSONResponse:
        if isinstance(exc, NotFoundError):
            return _error(404, "not_found", str(exc))
        if isinstance(exc, ConflictError):
            return _error(409, "conflict", str(exc), [{"field": exc.field, "message": str(exc)}])
        if isinstance(exc, InvalidInputError):
            fields = [{"field": f, "message": m} for f, m in exc.errors]
            return _error(422, "invalid_input", str(exc), fields)
        if isinstance(exc, DatabaseTransactionError | ServiceUnavailableError):
            response = _error(503, "unavailable", "a dependency is unavailable; retry later")
            response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
            return response
        return _error(500, "internal", "internal error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """Routing errors in our format; OPTIONS and 405 list every method of the path."""
        if exc.status_code not in (404, 405):
            return _error(exc.status_code, "http_error", str(exc.detail))
        allowed = _allowed_methods(request.app, request.url.path)
        if not allowed:
            return _error(404, "not_found", f"no such resource: {request.url.path[:200]}")
        allow = {"Allow": ", ".join(sorted(allowed | {"OPTIONS"}))}
        if request.method == "OPTIONS":
            return Response(status_code=204, headers=allow)
        message = f"{request.method} is not allowed here; allowed: {allow['Allow']}"
        return _error(405, "method_not_allowed", message, headers=allow)

    @app.exception_handler(BodyTooLarge)
    async def too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
        return _error(413, "too_large", str(exc), [{"field": "body", "message": str(exc)}])

    @app.exception_handler(UnsupportedMediaType)
    async def unsupported(_: Request, exc: UnsupportedMediaType) -> JSONResponse:
        fields = [{"field": "content-type", "message": str(exc)}]
        return _error(415, "unsupported_media_type", str(exc), fields)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [
            {"field": ".".join(str(p) for p in e["loc"][1:]) or "request", "message": e["msg"]}
            for e in exc.errors()
        ]
        summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
        return _error(422, "invalid_input", f"invalid request: {summary}", fields)

    def state(request: Request) -> Gateway:
        found: Gateway = request.app.state.gateway
        return found

    async def authorize(request: Request, tenant_id: uuid.UUID) -> Gateway:
        gw = state(request)
        if request.scope.get(TENANT_SCOPE_KEY) == tenant_id:  # Authenticator checked it
            return gw
        key = request.headers.get("x-api-key")
        if not key:
            raise _Unauthorized("missing X-API-Key header")
        owner = gw.keys.cached(key)
        if owner is None:
            async with gw.database.session() as session:
                owner = await gw.keys.tenant_for_key(session, key)
        if owner is None:
            raise _Unauthorized("invalid API key")
        if owner != tenant_id:
            raise NotFoundError(f"unknown tenant {tenant_id}", field="tenant_id")
        structlog.contextvars.bind_contextvars(tenant=str(tenant_id))  # this request's lines
        return gw

    @app.exception_handler(_Unauthorized)
    async def unauthorized(_: Request, exc: _Unauthorized) -> JSONResponse:
        return _error(401, "unauthorized", str(exc), [{"field": "X-API-Key", "message": str(exc)}])

    @app.post(
        "/v1/tenants/{tenant_id}/products",
        status_code=201,
        response_model=ProductOut,
        responses=error_responses(401, 404, 409, 413, 415, 422, 503),
        openapi_extra=PRODUCT_BODY,
        summary="Create a product and queue its enrichment",
    )
    async def post_product(tenant_id: uuid.UUID, request: Request) -> JSONResponse:
        gw = await authorize(request, tenant_id)
        media_type(request.headers.get("content-type", ""), JSON_TYPES)
        unencoded(request.headers.get("content-encoding"))
        raw = await read_body(
            request.stream(), request.headers.get("content-length"), MAX_PRODUCT_BYTES
        )
        data = parse_product(product_document(raw))
        try:
            product, staged = await _accept_product(gw.database, tenant_id, data, gw.outbox_lease)
        except DatabaseTransactionError as exc:
            if not exc.commit_outcome_unknown:
                raise
            # The COMMIT's answer was lost: look before saying 503 (its SKUs are ours).
            found = await _committed_product(gw.database, tenant_id, data.variants[0].sku)
            if found is None:
                raise
            _log.warning("commit outcome was unknown; the product is committed", origin="product")
            return JSONResponse(found, status_code=201)
        # Committed: from here on nothing may turn the answer into an error.
        await _publish_after_commit(gw, staged, request, origin="product")
        return JSONResponse(_committed_view(product, data), status_code=201)

    @app.get(
        "/v1/tenants/{tenant_id}/products/{product_id}",
        response_model=ProductOut,
        responses=ERROR_RESPONSES,
        summary="A product with its variants and enrichment state",
    )
    async def get_product(
        tenant_id: uuid.UUID, product_id: uuid.UUID, request: Request
    ) -> dict[str, Any]:
        gw = await authorize(request, tenant_id)
        async with gw.database.session() as session:
            return await _load_product(session, tenant_id, product_id)

    @app.get(
        "/v1/tenants/{tenant_id}/products",
        response_model=ProductPage,
        responses=ERROR_RESPONSES,
        summary="A page of the tenant's products",
    )
    async def list_products(
        tenant_id: uuid.UUID,
        request: Request,
        limit: int = Query(50, ge=1, le=100),
        offset: int = Query(0, ge=0, le=1_000_000),
    ) -> dict[str, Any]:
        gw = await authorize(request, tenant_id)
        async with gw.database.session() as session:
            total = await session.scalar(
                select(func.count()).select_from(Product).where(Product.tenant_id == tenant_id)
            )
            ids = (
                await session.scalars(
                    select(Product.id)
                    .where(Product.tenant_id == tenant_id)
                    .order_by(Product.created_at, Product.id)
                    .limit(limit)
                    .offset(offset)
                )
            ).all()
            items = [await _load_product(session, tenant_id, pid) for pid in ids]
        return {"items": items, "total": int(total or 0), "limit": limit, "offset": offset}

    @app.post(
        "/v1/tenants/{tenant_id}/imports",
        status_code=202,
        response_model=ImportAccepted,
        responses=error_responses(401, 404, 413, 415, 422, 503),
        openapi_extra=IMPORT_BODY,
        summary="Import a catalog: each record becomes one message, processed or dead-lettered",
    )
    async def post_import(tenant_id: uuid.UUID, request: Request) -> JSONResponse:
        gw = await authorize(request, tenant_id)
        kind = media_type(request.headers.get("content-type", ""), JSON_TYPES | NDJSON_TYPES)
        unencoded(request.headers.get("content-encoding"))
        declared = request.headers.get("content-length")
        records: list[str] | SpooledRecords
        if kind in JSON_TYPES:  # an array is parsed whole: MAX_IMPORT_BYTES at most
            raw = await read_body(request.stream(), declared, MAX_IMPORT_BYTES)
            records = split_import(raw, kind, max_records=gw.import_max_records)
            count = len(records)
        else:  # JSON lines are checked as they arrive and spooled: any size, bounded memory
            records = await spool_lines(
                request.stream(),
                declared,
                max_bytes=gw.import_max_bytes,
                max_records=gw.import_max_records,
            )
            count = records.count
        import_id = uuid.uuid4()
        accepted = JSONResponse({"import_id": str(import_id), "accepted": count}, status_code=202)
        try:
            if isinstance(records, list) or count <= _PUBLISHED_INLINE:
                written = await _accept_small_import(
                    gw.database, tenant_id, import_id, list(records), gw.outbox_lease
                )
            else:
                async with gw.database.session() as session:
                    written = await _accept_import(
                        session, tenant_id, import_id, records, count, gw.outbox_lease
                    )
        except DatabaseTransactionError as exc:
            if not exc.commit_outcome_unknown or not await _import_exists(gw.database, import_id):
                raise
            _log.warning("commit outcome was unknown; the import is committed", origin="import")
            return accepted  # its messages are the relay's once their lease expires
        finally:
            if isinstance(records, SpooledRecords):
                records.close()
        await _publish_after_commit(gw, written, request, origin="import")
        return accepted

    @app.get(
        "/v1/tenants/{tenant_id}/imports/{import_id}",
        response_model=ImportCounts,
        responses=ERROR_RESPONSES,
        summary="Where an import's records are",
    )
    async def get_import(
        tenant_id: uuid.UUID, import_id: uuid.UUID, request: Request
    ) -> dict[str, Any]:
        gw = await authorize(request, tenant_id)
        async with gw.database.session() as session:
            counts = await import_counts(session, tenant_id, import_id)
        if counts is None:
            raise NotFoundError(f"unknown import {import_id}", field="import_id")
        return {"import_id": str(import_id), **counts}

    @app.get("/healthz", response_model=Health, summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "A dependency is unavailable"}},
        summary="The database, Redis and the broker answer",
    )
    async def readyz(request: Request) -> JSONResponse:
        checks = await state(request).readiness.checks()
        ready = all(value == "ok" for value in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
        summary="Prometheus exposition",
    )
    async def metrics() -> Response:
        return Response(generate_latest(exposition_registry()), media_type=CONTENT_TYPE_LATEST)

    _dispatch_directly(app, "/v1/tenants/{tenant_id:uuid}/products", post_product)
    _dispatch_directly(app, "/v1/tenants/{tenant_id:uuid}/imports", post_import)
    return app


def _dispatch_directly(
    app: FastAPI, path: str, endpoint: Callable[[uuid.UUID, Request], Awaitable[Response]]
) -> None:
    """Serve the write routes through a plain Starlette route placed first: the same
    endpoint, middleware and error handlers, without FastAPI's per-request dependency
    solving (the routes take only the tenant id from the path and read the body
    themselves). Measured under load: FastAPI's dispatch was ~10 % of the gateway's CPU.
    The FastAPI route stays for the OpenAPI document, and serves what this one does not
    match (a tenant id that is not a UUID: 422 as before)."""

    async def direct(request: Request) -> Response:
        return await endpoint(request.path_params["tenant_id"], request)

    app.router.routes.insert(0, Route(path, direct, methods=["POST"], include_in_schema=False))


class _Unauthorized(Exception):
    pass


async def _accept_product(
    database: Database, tenant_id: uuid.UUID, data: ProductIn, lease: float
) -> tuple[Product, _Written]:
    """The product, its variants and its enrichment message: one transaction (one
    statement on PostgreSQL). The request publishes the message after the commit."""
    claim = Claim.new(staging_lease(lease))

    def enrichment(product_id: uuid.UUID) -> Staged:
        return Staged(
            f"enrich-{product_id}",
            tenant_id,
            ENRICH_TASK,
            REALTIME_QUEUE,
            [str(product_id), str(tenant_id)],
        )

    product = await create_product_with_message(database, tenant_id, data, enrichment, claim)
    staged = enrichment(product.id)
    return product, _Written(claim, [staged.message_id], [staged])


def _ingest(message_id: str, tenant_id: uuid.UUID, import_id: uuid.UUID, record: str) -> Staged:
    """One import record's message: the record as it came, on bulk_queue."""
    return Staged(
        message_id,
        tenant_id,
        INGEST_TASK,
        BULK_QUEUE,
        [record, str(tenant_id)],
        {"import_id": str(import_id)},
    )


async def _accept_small_import(
    database: Database,
    tenant_id: uuid.UUID,
    import_id: uuid.UUID,
    records: list[str],
    lease: float,
) -> _Written:
    """An import small enough to hold (a JSON array, or at most _PUBLISHED_INLINE lines):
    the import, its records and their messages in one statement on PostgreSQL."""
    claim = Claim.new(staging_lease(lease))
    staged = [_ingest(str(uuid.uuid4()), tenant_id, import_id, record) for record in records]
    await create_import_with_messages(database, tenant_id, import_id, staged, claim)
    if len(staged) > _PUBLISHED_INLINE:  # a large JSON array: published as a large import
        return _Written(claim, [m.message_id for m in staged], None)
    return _Written(claim, [m.message_id for m in staged], staged)


@transactional
async def _accept_import(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    import_id: uuid.UUID,
    records: Iterable[str],
    count: int,
    lease: float,
) -> _Written:
    """The import, a pending row per record and a message per record: one transaction,
    written a part at a time (an import of any size in bounded memory)."""
    claim = Claim.new(staging_lease(lease))
    await add_import(session, tenant_id, count, import_id=import_id)
    kept: list[Staged] | None = [] if count <= _PUBLISHED_INLINE else None
    ids: list[str] = []
    iterator = iter(records)
    while part := list(itertools.islice(iterator, _PART)):
        message_ids = [str(uuid.uuid4()) for _ in part]
        await add_import_records(session, import_id, tenant_id, message_ids, first=len(ids))
        staged = [
            _ingest(message_id, tenant_id, import_id, record)
            for message_id, record in zip(message_ids, part, strict=True)
        ]
        await stage_messages(session, staged, claim)
        if kept is not None:
            kept += staged
        ids += message_ids
    if kept is None:  # a long transaction: hold its rows from the commit, not from its start
        now = datetime.now(UTC)
        claim = Claim(claim.owner, now + timedelta(seconds=staging_lease(lease)))
        await extend_claim(session, claim, now=now)
    return _Written(claim, ids, kept)


@dataclass(frozen=True)
class _Written:
    """What a request committed to the outbox: its claim, the message ids, and the
    messages themselves when few enough to publish from memory."""

    claim: Claim
    ids: list[str]
    staged: list[Staged] | None


async def _publish_after_commit(
    gw: Gateway, written: _Written, request: Request, *, origin: str
) -> None:
    """Publish what was just committed. Never raises: the request's data is committed, so
    its answer is success; what could not be published or cleared is the relay's. A large
    import is published in the background, read back from the outbox a part at a time.
    The wait is bounded (``OutboxPublisher.publish``). While the publisher keeps up, the
    request gives its admission slot back before it waits for the broker; when it is
    congested the request keeps it, so admission slows new writes to the broker's pace."""
    if not gw.outbox.congested:
        release_slot(request.scope)
    try:
        if written.staged is None:
            gw.outbox.publish_later(written.ids, written.claim, origin=origin)
        else:
            await gw.outbox.publish(written.staged, written.claim, origin=origin)
    except Exception as exc:
        _log.warning(
            "publishing after the commit failed; the outbox relay will send what is left",
            origin=origin,
            messages=len(written.ids),
            error=describe_exception(exc),
        )


async def _import_exists(database: Database, import_id: uuid.UUID) -> bool:
    """Whether an import whose COMMIT outcome was unknown is there (False if unsure)."""
    try:
        async with database.session() as session:
            return await session.get(Import, import_id) is not None
    except Exception:
        return False


async def _committed_product(
    database: Database, tenant_id: uuid.UUID, sku: str
) -> dict[str, Any] | None:
    """The product holding ``sku`` after a COMMIT of unknown outcome (None if unsure)."""
    try:
        async with database.session() as session:
            product_id = await session.scalar(
                select(Variant.product_id).where(Variant.tenant_id == tenant_id, Variant.sku == sku)
            )
            if product_id is None:
                return None
            return await _load_product(session, tenant_id, product_id)
    except Exception:
        return None


def _committed_view(product: Product, data: ProductIn) -> dict[str, Any]:
    """The view of a product just committed, from what was written (no read after the
    commit: the database may be gone by now, and the answer must still be 201)."""
    variants = [
        Variant(
            sku=v.sku,
            price=v.price.quantize(_CENTS),
            currency=v.currency,
            attributes=dict(v.attributes),
        )
        for v in sorted(data.variants, key=lambda v: v.sku)
    ]
    return _product_view(product, variants, None)


async def _load_product(
    session: Any, tenant_id: uuid.UUID, product_id: uuid.UUID
) -> dict[str, Any]:
    product = await session.scalar(
        select(Product).where(Product.id == product_id, Product.tenant_id == tenant_id)
    )
    if product is None:
        raise NotFoundError(f"unknown product {product_id}", field="product_id")
    variants = (
        await session.scalars(
            select(Variant).where(Variant.product_id == product_id).order_by(Variant.sku)
        )
    ).all()
    enrichment = await session.get(Enrichment, product_id)
    return _product_view(product, list(variants), enrichment)
