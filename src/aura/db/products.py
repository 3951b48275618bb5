"""Writing the catalog: products with their variants, all or nothing.

``create_product_with_variants`` is the seed's example of ``@transactional``. Product data
is validated before any statement is sent; a missing tenant or a SKU the tenant already
uses is reported by name, and nothing is written.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from aura.catalog import ProductIn, VariantIn, parse_product
from aura.catalog.schema import parse_variant
from aura.db.models import Product, Tenant, Variant
from aura.db.transactional import transactional
from aura.errors import ConflictError, InvalidInputError, NotFoundError

__all__ = [
    "create_product",
    "create_product_with_variants",
    "create_tenant",
    "create_variants",
]


async def _require_tenant(session: AsyncSession, tenant_id: uuid.UUID) -> None:
    if await session.get(Tenant, tenant_id) is None:
        raise NotFoundError(f"unknown tenant {tenant_id}", field="tenant_id")


async def _require_free_skus(
    session: AsyncSession, tenant_id: uuid.UUID, skus: Sequence[str]
) -> None:
    taken = (
        await session.scalars(
            select(Variant.sku).where(Variant.tenant_id == tenant_id, Variant.sku.in_(skus))
        )
    ).all()
    if taken:
        listed = ", ".join(repr(sku) for sku in sorted(taken))
        raise ConflictError(f"SKU already used by this tenant: {listed}", field="variants")


@transactional
async def create_tenant(
    session: AsyncSession, name: str, *, api_key_hash: str | None = None
) -> Tenant:
    name = name.strip()
    if not 1 <= len(name) <= 200:
        raise InvalidInputError("tenant name must be 1 to 200 characters", field="name")
    if await session.scalar(select(Tenant.id).where(Tenant.name == name)) is not None:
        raise ConflictError(f"tenant {name!r} already exists", field="name")
    tenant = Tenant(name=name, api_key_hash=api_key_hash)
    session.add(tenant)
    await session.flush()
    return tenant


async def create_product(
    session: AsyncSession, tenant_id: uuid.UUID, product_data: ProductIn | Mapping[str, Any]
) -> Product:
    """Add the product row (not its variants) to the current transaction."""
    data = product_data if isinstance(product_data, ProductIn) else parse_product(product_data)
    product = Product(
        tenant_id=tenant_id,
        title=data.title,
        description=data.description,
        brand=data.brand,
        category=data.category,
    )
    session.add(product)
    await session.flush()
    return product


async def create_variants(
    session: AsyncSession,
    product_id: uuid.UUID,
    variants: Sequence[VariantIn | Mapping[str, Any]],
    *,
    tenant_id: uuid.UUID,
) -> list[Variant]:
    """Add a product's variants to the current transaction; a taken SKU is a ConflictError."""
    rows = [
        Variant(
            tenant_id=tenant_id,
            product_id=product_id,
            sku=item.sku,
            price=item.price,
            currency=item.currency,
            attributes=dict(item.attributes),
        )
        for item in (
            v if isinstance(v, VariantIn) else parse_variant(v, index)
            for index, v in enumerate(variants)
        )
    ]
    session.add_all(rows)
    try:
        await session.flush()
    except sa_exc.IntegrityError as exc:  # a concurrent writer took a SKU after our check
        raise ConflictError(
            "SKU already used by this tenant (taken concurrently)", field="variants"
        ) from exc
    return rows


@transactional
async def create_product_with_variants(
    session: AsyncSession, tenant_id: uuid.UUID, product_data: ProductIn | Mapping[str, Any]
) -> Product:
    """Validate, then write a product and its variants in one transaction."""
    data = product_data if isinstance(product_data, ProductIn) else parse_product(product_data)
    await _require_tenant(session, tenant_id)
    await _require_free_skus(session, tenant_id, [variant.sku for variant in data.variants])
    product = await create_product(session, tenant_id, data)
    await create_variants(session, product.id, data.variants, tenant_id=tenant_id)
    return product
