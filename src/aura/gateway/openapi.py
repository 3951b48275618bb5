"""The OpenAPI document: the product schema the routes read by hand (they parse the raw
body themselves, to refuse what PostgreSQL would refuse before pydantic sees it), the
``X-API-Key`` scheme, and our error body for every status, 404/405/415 included."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from aura.catalog import ProductIn
from aura.gateway.bodies import MAX_IMPORT_RECORDS, NDJSON_TYPES

__all__ = ["API_KEY_SCHEME", "IMPORT_BODY", "PRODUCT_BODY", "build_openapi"]

# Every /v1/ operation needs it. Documented here, not declared as a FastAPI dependency:
# the routes check the key themselves (401 in our error body), and a dependency per
# request was 2 % of the gateway's CPU under load for a header read the route does anyway.
API_KEY_SCHEME = {
    "type": "apiKey",
    "in": "header",
    "name": "X-API-Key",
    "description": "The tenant's API key",
}
_PRODUCT_REF = {"$ref": "#/components/schemas/ProductIn"}


def _body(content: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": content}}


PRODUCT_BODY = _body({"application/json": {"schema": _PRODUCT_REF}})
IMPORT_BODY = _body(
    {
        "application/json": {
            "schema": {
                "type": "array",
                "items": {
                    "type": "object",
                    "description": "A record: a JSON object of at most 256 KiB, meant to "
                    "be a ProductIn",
                },
                "minItems": 1,
                "maxItems": MAX_IMPORT_RECORDS,
                "description": "Records, each meant to be a ProductIn. A record that is "
                "an object but not a valid product is accepted and dead-lettered by the "
                "worker with its reason; a record that is not an object, is over 256 KiB, "
                "or that PostgreSQL could not hold (a NUL character, nesting deeper than "
                "32) is refused here (422, naming records.N).",
            }
        },
        **{
            kind: {
                "schema": {
                    "type": "string",
                    "pattern": "\\S",
                    "description": "JSON lines: one record per line, as for the array",
                }
            }
            for kind in sorted(NDJSON_TYPES)
        },
    }
)


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, plus the product models the request bodies refer to."""
    if app.openapi_schema:
        return app.openapi_schema
    document = get_openapi(
        title=app.title,
        version=app.version,
        description="Tenants' catalogs in, enrichment state out. Every error body is "
        '{"error": {"code", "message", "fields"}}.',
        routes=app.routes,
    )
    product = ProductIn.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(product.pop("$defs", {}))
    schemas["ProductIn"] = product
    document["components"]["securitySchemes"] = {"APIKeyHeader": API_KEY_SCHEME}
    for path, operations in document.get("paths", {}).items():
        if path.startswith("/v1/"):
            for operation in operations.values():
                operation["security"] = [{"APIKeyHeader": []}]
    app.openapi_schema = document
    return document
