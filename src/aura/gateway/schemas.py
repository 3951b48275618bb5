"""What the gateway answers, as pydantic models: the OpenAPI document is built from them,
so a schema-driven client (or fuzzer) sees the real shapes, including our error body."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

__all__ = [
    "ERROR_RESPONSES",
    "EnrichmentOut",
    "ErrorBody",
    "ErrorDetail",
    "FieldError",
    "Health",
    "ImportAccepted",
    "ImportCounts",
    "ProductOut",
    "ProductPage",
    "Readiness",
    "VariantOut",
    "error_responses",
]


class FieldError(BaseModel):
    field: str = Field(description="Dotted path of the offending field (variants.0.price).")
    message: str


class ErrorDetail(BaseModel):
    code: str = Field(description="not_found, invalid_input, conflict, unavailable, ...")
    message: str = Field(description="One line, for a person.")
    fields: list[FieldError] | None = Field(
        default=None, description="Each offending field (absent when none is to blame)."
    )


class ErrorBody(BaseModel):
    """Every error the gateway answers, whatever the status."""

    error: ErrorDetail


class VariantOut(BaseModel):
    sku: str
    price: str = Field(description="Decimal, as a string: 59.90")
    currency: str
    attributes: dict[str, str | int | float | bool]


class EnrichmentOut(BaseModel):
    state: Literal["pending", "done"]
    description: str | None = None
    tags: list[str] | None = None


class ProductOut(BaseModel):
    id: uuid.UUID
    tenant_id: uuid.UUID
    title: str
    description: str | None
    brand: str | None
    category: str | None
    created_at: datetime
    variants: list[VariantOut]
    enrichment: EnrichmentOut


class ProductPage(BaseModel):
    items: list[ProductOut]
    total: int
    limit: int
    offset: int


class ImportAccepted(BaseModel):
    import_id: uuid.UUID
    accepted: int = Field(description="Records accepted; each is processed or dead-lettered.")


class ImportCounts(BaseModel):
    import_id: uuid.UUID
    accepted: int
    pending: int
    done: int
    dead_lettered: int


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, str]


_DESCRIPTIONS = {
    401: "Missing or invalid X-API-Key",
    404: "Unknown tenant, product or import (another tenant's is unknown too)",
    409: "A SKU the tenant already uses",
    413: "Body over its size limit",
    415: "Content type not accepted by this operation",
    422: "Invalid input; every offending field is named",
    503: "Overloaded, or a dependency is unavailable; retry after Retry-After seconds",
}
_RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds"}}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for ``statuses``, each with our error body."""
    found: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorBody, "description": _DESCRIPTIONS[status]}
        if status == 503:
            entry["headers"] = _RETRY_AFTER
        found[status] = entry
    return found


ERROR_RESPONSES = error_responses(401, 404, 422, 503)
