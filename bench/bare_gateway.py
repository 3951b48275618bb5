"""The baseline for bench/gateway_load.py: a bare FastAPI + asyncpg endpoint doing the
same insert as the gateway's POST products (a product and its variant, one transaction),
with no validation beyond pydantic, no outbox, no auth lookup cache: what the platform
costs is measured against this, in the same run.

    BARE_DSN=postgresql://... uvicorn bench.bare_gateway:app --port 8001
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
from fastapi import FastAPI
from pydantic import BaseModel


class Variant(BaseModel):
    sku: str
    price: Decimal
    currency: str = "USD"


class Product(BaseModel):
    title: str
    variants: list[Variant]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.pool = await asyncpg.create_pool(os.environ["BARE_DSN"], min_size=5, max_size=50)
    yield
    await app.state.pool.close()


app = FastAPI(lifespan=lifespan)


@app.post("/v1/tenants/{tenant_id}/products", status_code=201)
async def create(tenant_id: uuid.UUID, product: Product) -> dict[str, str]:
    product_id = uuid.uuid4()
    now = datetime.now(UTC)
    async with app.state.pool.acquire() as connection, connection.transaction():
        await connection.execute(
            "insert into products (id, tenant_id, title, created_at) values ($1, $2, $3, $4)",
            product_id,
            tenant_id,
            product.title,
            now,
        )
        await connection.executemany(
            "insert into variants (id, tenant_id, product_id, sku, price, currency, attributes)"
            " values ($1, $2, $3, $4, $5, $6, '{}')",
            [
                (uuid.uuid4(), tenant_id, product_id, v.sku, v.price, v.currency)
                for v in product.variants
            ],
        )
    return {"id": str(product_id)}
