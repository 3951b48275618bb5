"""Writing the catalog: products with their variants, all or nothing.

``create_product_with_variants`` is the seed's example of ``@transactional``. Product data
is validated before any statement is sent; a missing tenant or a SKU the tenant already
uses is reported by name, and nothing is written.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, insert, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from aura.catalog import ProductIn, VariantIn, parse_product
from aura.catalog.schema import parse_variant
from aura.db.models import Product, Tenant, Variant
from aura.db.transactional import transactional
from aura.errors import ConflictError, InvalidInputError, NotFoundError

_PRODUCTS = cast(Table, Product.__table__)
_VARIANTS = cast(Table, Variant.__table__)

__all__ = [
    "create_product",
    "create_product_with_variants",
    "create_tenant",
    "create_variants",
]


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
    """Insert the product row (not its variants) in the current transaction; an unknown
    tenant (its foreign key) is a NotFoundError. The ``Product`` returned is not attached
    to the session."""
    data = product_data if isinstance(product_data, ProductIn) else parse_product(product_data)
    product = Product(
        id=uuid.uuid4(),
        tenant_id=tenant_id,
        title=data.title,
        description=data.description,
        brand=data.brand,
        category=data.category,
        created_at=datetime.now(UTC),
    )
    try:
        await session.execute(
            insert(_PRODUCTS).values(
                id=product.id,
                tenant_id=tenant_id,
                title=product.title,
                description=product.description,
                brand=product.brand,
                category=product.category,
                created_at=product.created_at,
            )
        )
    except sa_exc.IntegrityError as exc:  # the only constraint a new id can break
        raise NotFoundError(f"unknown tenant {tenant_id}", field="tenant_id") from exc
    return product


async def create_variants(
    session: AsyncSession,
    product_id: uuid.UUID,
    variants: Sequence[VariantIn | Mapping[str, Any]],
    *,
    tenant_id: uuid.UUID,
) -> list[Variant]:
    """Insert a product's variants in the current transaction, in one ``INSERT ... ON
    CONFLICT DO NOTHING RETURNING sku``: a SKU the tenant already uses (even one a
    concurrent writer took a moment ago) is missing from the answer, and is named in a
    ConflictError. The ``Variant`` objects returned are not attached to the session."""
    rows = [
        Variant(
            id=uuid.uuid4(),
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
    statement = (
        _insert_for(session)(_VARIANTS)
        .on_conflict_do_nothing(index_elements=[_VARIANTS.c.tenant_id, _VARIANTS.c.sku])
        .returning(_VARIANTS.c.sku)
    )
    values = [
        {
            "id": v.id,
            "tenant_id": v.tenant_id,
            "product_id": v.product_id,
            "sku": v.sku,
            "price": v.price,
            "currency": v.currency,
            "attributes": v.attributes,
        }
        for v in rows
    ]
    written = set((await session.execute(statement, values)).scalars().all())
    taken = sorted({v.sku for v in rows if v.sku not in written})
    if taken:
        listed = ", ".join(repr(sku) for sku in taken)
        raise ConflictError(f"SKU already used by this tenant: {listed}", field="variants")
    return rows


@transactional
async def create_product_with_variants(
    session: AsyncSession, tenant_id: uuid.UUID, product_data: ProductIn | Mapping[str, Any]
) -> Product:
    """Validate, then write a product and its variants in one transaction: two statements,
    no reads first (see ``create_product`` and ``create_variants`` for how an unknown
    tenant and a taken SKU are found). Either failure names its field and rolls
    everything back."""
    data = product_data if isinstance(product_data, ProductIn) else parse_product(product_data)
    product = await create_product(session, tenant_id, data)
    await create_variants(session, product.id, data.variants, tenant_id=tenant_id)
    return product


def _insert_for(session: AsyncSession) -> Any:
    """The dialect's INSERT (ON CONFLICT is PostgreSQL's and SQLite's own syntax)."""
    if session.get_bind().dialect.name == "sqlite":
        return sqlite_insert
    return pg_insert
