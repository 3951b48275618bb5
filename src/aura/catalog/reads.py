"""Reading products back: one product, or a page of a tenant's, each in two queries
whatever the page's size (the products with their enrichments in one, joined; all their
variants in the other, by ``IN``). A page of 100 products took 301 queries when each
product was read on its own.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from aura.catalog.models import Enrichment, Product, Variant

__all__ = ["ProductPage", "StoredProduct", "product_page", "stored_product"]


@dataclass(frozen=True)
class StoredProduct:
    """A product as committed: its variants (by SKU) and its enrichment, if any yet."""

    product: Product
    variants: list[Variant]
    enrichment: Enrichment | None


@dataclass(frozen=True)
class ProductPage:
    items: list[StoredProduct]
    total: int  # the tenant's products, all pages


def _with_enrichment(tenant_id: uuid.UUID) -> Select[Product, Enrichment]:
    return (
        select(Product, Enrichment)
        .outerjoin(Enrichment, Enrichment.product_id == Product.id)
        .where(Product.tenant_id == tenant_id)
    )


async def _variants_of(
    session: AsyncSession, rows: Sequence[tuple[Product, Enrichment | None]]
) -> list[StoredProduct]:
    ids = [product.id for product, _ in rows]
    variants: dict[uuid.UUID, list[Variant]] = defaultdict(list)
    if ids:
        found = await session.scalars(
            select(Variant).where(Variant.product_id.in_(ids)).order_by(Variant.sku)
        )
        for variant in found:
            variants[variant.product_id].append(variant)
    return [StoredProduct(p, variants[p.id], e) for p, e in rows]


async def stored_product(
    session: AsyncSession, tenant_id: uuid.UUID, product_id: uuid.UUID
) -> StoredProduct | None:
    """The tenant's product ``product_id``; None if the tenant has none by that id."""
    row = (
        await session.execute(_with_enrichment(tenant_id).where(Product.id == product_id))
    ).first()
    if row is None:
        return None
    return (await _variants_of(session, [(row[0], row[1])]))[0]


async def product_page(
    session: AsyncSession, tenant_id: uuid.UUID, *, limit: int, offset: int
) -> ProductPage:
    """The tenant's products ``offset`` to ``offset + limit``, oldest first, and how many
    it has in all (counted in the page's query; a page past the end counts alone)."""
    page = (
        _with_enrichment(tenant_id)
        .add_columns(func.count().over().label("total"))
        .order_by(Product.created_at, Product.id)
        .limit(limit)
        .offset(offset)
    )
    rows = (await session.execute(page)).all()
    if rows:
        total = int(rows[0].total)
    else:
        counted = select(func.count()).select_from(Product).where(Product.tenant_id == tenant_id)
        total = int(await session.scalar(counted) or 0)
    items = await _variants_of(session, [(row[0], row[1]) for row in rows])
    return ProductPage(items, total)
