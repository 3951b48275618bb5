"""Writing the catalog: products with their variants, all or nothing.

``create_product_with_variants`` is the seed's example of ``@transactional``. Product data
is validated before any statement is sent; a missing tenant or a SKU the tenant already
uses is reported by name, and nothing is written.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, cast

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import Table, insert, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from aura.catalog.models import Product, Tenant, Variant
from aura.catalog.schema import ProductIn, VariantIn, parse_product, parse_variant
from aura.db import Claim, Database, Staged, execute_atomically, stage_messages, transactional
from aura.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
)

_PRODUCTS = cast(Table, Product.__table__)
_VARIANTS = cast(Table, Variant.__table__)

__all__ = [
    "create_product",
    "create_product_with_message",
    "create_product_with_variants",
    "create_tenant",
    "create_variants",
    "taken_skus",
    "variant_arrays",
    "write_product_atomically",
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


def _new_product(tenant_id: uuid.UUID, data: ProductIn) -> Product:
    """The row a product is written as (a new id, now), not attached to any session."""
    return Product(
        id=uuid.uuid4(),
        tenant_id=tenant_id,
        title=data.title,
        description=data.description,
        brand=data.brand,
        category=data.category,
        created_at=datetime.now(UTC),
    )


async def create_product(
    session: AsyncSession, tenant_id: uuid.UUID, product_data: ProductIn | Mapping[str, Any]
) -> Product:
    """Insert the product row (not its variants) in the current transaction; an unknown
    tenant (its foreign key) is a NotFoundError. The ``Product`` returned is not attached
    to the session."""
    data = product_data if isinstance(product_data, ProductIn) else parse_product(product_data)
    product = _new_product(tenant_id, data)
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
    taken = {v.sku for v in rows if v.sku not in written}
    if taken:
        raise _skus_taken(taken)
    return rows


def _skus_taken(taken: Iterable[str]) -> ConflictError:
    listed = ", ".join(sorted(repr(sku) for sku in taken)) or "(since released)"
    return ConflictError(f"SKU already used by this tenant: {listed}", field="variants")


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


# The gateway's hot path, one statement: PostgreSQL runs it atomically on its own (no
# BEGIN, no COMMIT), so a product, its variants and its message are all written or none.
# A taken SKU fails the variants' unique constraint and with it the whole statement.
_WITH_MESSAGE = """
    WITH product AS (
        INSERT INTO products (id, tenant_id, title, description, brand, category, created_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
    ), message AS (
        INSERT INTO outbox (message_id, tenant_id, task, queue, args, kwargs, created_at,
                            claimed_by, claimed_until, traceparent)
        VALUES ($8, $2, $9, $10, $11::json, $12::json, $7, $13, $14, $15)
    )
    INSERT INTO variants (id, tenant_id, product_id, sku, price, currency, attributes)
    SELECT v.id, $2, $1, v.sku, v.price, v.currency, v.attributes
    FROM unnest($16::uuid[], $17::text[], $18::numeric[], $19::text[], $20::json[])
        AS v(id, sku, price, currency, attributes)
"""
_WRITE = "create_product_with_message"


async def create_product_with_message(
    database: Database,
    tenant_id: uuid.UUID,
    data: ProductIn,
    message: Callable[[uuid.UUID], Staged],
    claim: Claim,
) -> Product:
    """``create_product_with_variants`` and ``stage_messages`` of the one message the new
    product needs (``message(product_id)``), all or nothing.

    On PostgreSQL that is one statement on the pool's asyncpg connection, in autocommit:
    one round trip where a session's transaction takes five, and a third of the CPU
    (bench/RESULTS.md, "The gateway"). What ``@transactional`` promises still holds: all
    or nothing (one statement), a dropped connection is counted and logged as a
    network_error rollback and raised as ``DatabaseTransactionError`` -- always with
    ``commit_outcome_unknown``, since the statement commits as it ends. A taken SKU and
    an unknown tenant are reported as ``create_product_with_variants`` reports them.
    Elsewhere (SQLite) it is ``create_product_with_variants`` in a transaction."""
    if database.dialect != "postgresql":
        async with database.session() as session:
            return await _in_session(session, tenant_id, data, message, claim)
    product = _new_product(tenant_id, data)
    staged = message(product.id)
    arguments = (
        product.id,
        tenant_id,
        product.title,
        product.description,
        product.brand,
        product.category,
        product.created_at,
        staged.message_id,
        staged.task,
        staged.queue,
        json.dumps(staged.args),
        json.dumps(staged.kwargs),
        claim.owner,
        claim.until,
        staged.traceparent,
        *variant_arrays(data.variants),
    )
    await write_product_atomically(database, _WRITE, _WITH_MESSAGE, arguments, tenant_id, data)
    return product


def variant_arrays(variants: Sequence[VariantIn]) -> tuple[list[Any], ...]:
    """New variants as the one-statement writes take them: ids, SKUs, prices, currencies
    and attributes (JSON), one array each, for ``unnest``."""
    return (
        [uuid.uuid4() for _ in variants],
        [v.sku for v in variants],
        [v.price for v in variants],
        [v.currency for v in variants],
        [json.dumps(dict(v.attributes)) for v in variants],
    )


async def write_product_atomically(
    database: Database,
    function: str,
    statement: str,
    arguments: Sequence[Any],
    tenant_id: uuid.UUID,
    product: ProductIn,
) -> asyncpg.Record | None:
    """``execute_atomically`` of a statement that writes a new product of ``tenant_id``,
    its refusals named as ``create_product_with_variants`` names them: an unknown tenant
    (the new product's only reference) and the SKUs the tenant already uses."""
    try:
        return await execute_atomically(database, function, statement, *arguments)
    except asyncpg.ForeignKeyViolationError as exc:
        raise NotFoundError(f"unknown tenant {tenant_id}", field="tenant_id") from exc
    except asyncpg.UniqueViolationError as exc:  # a SKU: the new ids cannot clash
        skus = [v.sku for v in product.variants]
        raise _skus_taken(await taken_skus(database, tenant_id, skus)) from exc


async def taken_skus(database: Database, tenant_id: uuid.UUID, skus: Sequence[str]) -> list[str]:
    """Which of ``skus`` the tenant's variants use now (naming them after a statement
    failed on the unique constraint)."""
    async with database.session() as session:
        found = await session.scalars(
            select(Variant.sku).where(Variant.tenant_id == tenant_id, Variant.sku.in_(skus))
        )
        return list(found.all())


@transactional
async def _in_session(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    data: ProductIn,
    message: Callable[[uuid.UUID], Staged],
    claim: Claim,
) -> Product:
    product = await create_product_with_variants(session, tenant_id, data)
    await stage_messages(session, [message(product.id)], claim)
    return product
