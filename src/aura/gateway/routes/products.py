"""/v1/tenants/{tenant_id}/products: create one (201, enrichment queued), read one, list
a page (two queries whatever its size: ``aura.catalog.reads``)."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import structlog
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select

from aura.catalog import Product, ProductIn, Variant, create_product_with_message, parse_product
from aura.catalog.reads import StoredProduct, product_page, stored_product
from aura.contract import ENRICH_TASK, REALTIME_QUEUE
from aura.db import Claim, Database, Staged
from aura.errors import DatabaseTransactionError, NotFoundError
from aura.gateway.bodies import (
    JSON_TYPES,
    MAX_PRODUCT_BYTES,
    media_type,
    product_document,
    read_body,
    unencoded,
)
from aura.gateway.committed import Written, publish_after_commit
from aura.gateway.openapi import PRODUCT_BODY
from aura.gateway.relay import staging_lease
from aura.gateway.schemas import ERROR_RESPONSES, ProductOut, ProductPage, error_responses
from aura.gateway.state import Authorized, authorize

__all__ = ["get_product", "list_products", "post_product", "router"]

_CENTS = Decimal("0.01")
_log = structlog.get_logger("aura.gateway")
router = APIRouter(prefix="/v1/tenants/{tenant_id}/products")


@router.post(
    "",
    status_code=201,
    response_model=ProductOut,
    responses=error_responses(401, 404, 409, 413, 415, 422, 503),
    openapi_extra=PRODUCT_BODY,
    summary="Create a product and queue its enrichment",
)
async def post_product(tenant_id: uuid.UUID, request: Request) -> JSONResponse:
    gw = await authorize(request, tenant_id)  # served directly: no dependency solving
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
    await publish_after_commit(gw, staged, request.scope, origin="product")
    return JSONResponse(_committed_view(product, data), status_code=201)


@router.get(
    "/{product_id}",
    response_model=ProductOut,
    responses=ERROR_RESPONSES,
    summary="A product with its variants and enrichment state",
)
async def get_product(
    tenant_id: uuid.UUID, product_id: uuid.UUID, gw: Authorized
) -> dict[str, Any]:
    async with gw.database.session() as session:
        found = await stored_product(session, tenant_id, product_id)
    if found is None:
        raise NotFoundError(f"unknown product {product_id}", field="product_id")
    return _view(found)


@router.get(
    "",
    response_model=ProductPage,
    responses=ERROR_RESPONSES,
    summary="A page of the tenant's products",
)
async def list_products(
    tenant_id: uuid.UUID,
    gw: Authorized,
    limit: int = Query(50, ge=1, le=100),
    offset: int = Query(0, ge=0, le=1_000_000),
) -> dict[str, Any]:
    async with gw.database.session() as session:
        page = await product_page(session, tenant_id, limit=limit, offset=offset)
    items = [_view(item) for item in page.items]
    return {"items": items, "total": page.total, "limit": limit, "offset": offset}


async def _accept_product(
    database: Database, tenant_id: uuid.UUID, data: ProductIn, lease: float
) -> tuple[Product, Written]:
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
    return product, Written(claim, [staged.message_id], [staged])


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
            found = await stored_product(session, tenant_id, product_id)
    except Exception:
        return None
    return None if found is None else _view(found)


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
    return _view(StoredProduct(product, variants, None))


def _view(stored: StoredProduct) -> dict[str, Any]:
    product, enrichment = stored.product, stored.enrichment
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
            for v in stored.variants
        ],
        "enrichment": {"state": "pending"}
        if enrichment is None
        else {"state": "done", "description": enrichment.description, "tags": enrichment.tags},
    }
