"""The worker's reads and writes of a catalog record, each one statement on PostgreSQL.

    ingest_record      the inbox claim, the product, its variants and its import record
                       marked done: all or nothing
    read_for_prompt    what the enrichment prompt uses: title, brand, category, SKUs
    store_enrichment   the inbox claim and the enrichment (upsert): all or nothing

Each write is one statement (data-modifying CTEs) sent in autocommit on the pool's asyncpg
connection (``aura.db._statement``): PostgreSQL runs it as its own transaction, so a crash
anywhere -- the connection cut between the statement and its reply included -- leaves the
claim and the effect both committed or both absent, and the next delivery decides as it
would after a ``@transactional`` function. Under load a session's BEGIN, four statements
and COMMIT were six trips through the event loop, each waiting behind every other task's
callbacks: at 100 tasks in flight an ingest held its slot ~70 ms for its writes
(bench/RESULTS.md, "The platform path").

The claim's outcome comes back with the statement: claimed, or the fingerprint and the
product already stored under the message id, read in the statement's snapshot. A twin
delivery that committed after that snapshot was taken (the claim waited for it) is not
in it; then both are read again, in a statement of their own.

Each write exists twice, on purpose: SQLite (``aura demo``'s embedded default) has no
data-modifying CTEs, so there the same effects are ``claim_message`` and
``create_product_with_variants`` in one session transaction (the end of this module);
PostgreSQL takes the one statement (one trip where a session takes six). The refusals are
named in one place for both (``aura.catalog.products``). What the caller sees is
what those functions say in a session: ``ConflictingMessageIdError`` for an
id committed for another payload, ``ConflictError`` naming the SKUs the tenant already
uses, ``NotFoundError`` for an unknown tenant or product, ``DatabaseTransactionError``
(``commit_outcome_unknown``) when the connection went away.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import Table, bindparam, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from aura.catalog.imports import mark_record
from aura.catalog.models import Enrichment, ImportRecord, Product, Variant
from aura.catalog.products import (
    create_product_with_variants,
    variant_arrays,
    write_product_atomically,
)
from aura.catalog.schema import ProductIn
from aura.db import Database, claim_message, execute_atomically, fetch_row, transactional
from aura.errors import ConflictingMessageIdError, NotFoundError
from aura.message_id import validate_message_id

__all__ = ["Ingested", "PromptFacts", "ingest_record", "read_for_prompt", "store_enrichment"]


@dataclass(frozen=True)
class Ingested:
    """The product a record's message made; ``created`` is False for a delivery whose
    effect was already committed (nothing was written this time)."""

    product_id: uuid.UUID
    created: bool


@dataclass(frozen=True)
class PromptFacts:
    title: str
    brand: str | None
    category: str | None
    skus: list[str]


@dataclass(frozen=True)
class _Claim:
    claimed: bool
    stored: str | None  # the fingerprint committed under the id (not claimed)
    made: uuid.UUID | None = None  # the product its import record names (ingest)


# Both writes open with the inbox claim ($1 message id, $2 task, $3 tenant, $4 fingerprint,
# $5 now) and answer with it: claimed, or what is committed under the id. (The f-strings
# below join these constants only: every value is a bind parameter.)
# Times are the database's (statement_timestamp()), never a worker's wall clock: a worker
# 600 s ahead wrote its products 10 minutes into the future (their listing order, and the
# chaos run's latencies, followed its clock).
_CLAIM = """
    WITH claim AS (
        INSERT INTO processed_messages (message_id, task, tenant_id, fingerprint, processed_at)
        VALUES ($1, $2, $3::uuid, $4, statement_timestamp())
        ON CONFLICT (message_id) DO NOTHING
        RETURNING message_id
    )"""
_STORED_FINGERPRINT = "(SELECT fingerprint FROM processed_messages WHERE message_id = $1) AS stored"
_STORED_PRODUCT = "(SELECT product_id FROM import_records WHERE message_id = $1) AS made"
_INGEST = f"""{_CLAIM}, product AS (
        INSERT INTO products (id, tenant_id, title, description, brand, category, created_at)
        SELECT $5::uuid, $3::uuid, $6::text, $7::text, $8::text, $9::text, statement_timestamp()
        FROM claim
        RETURNING id
    ), variants AS (
        INSERT INTO variants (id, tenant_id, product_id, sku, price, currency, attributes)
        SELECT v.id, $3::uuid, product.id, v.sku, v.price, v.currency, v.attributes
        FROM product,
             unnest($10::uuid[], $11::text[], $12::numeric[], $13::text[], $14::json[])
                AS v(id, sku, price, currency, attributes)
    ), record AS (
        UPDATE import_records
        SET status = 'done', product_id = product.id, updated_at = statement_timestamp()
        FROM product WHERE import_records.message_id = $1
    )
    SELECT EXISTS (SELECT 1 FROM claim) AS claimed, {_STORED_FINGERPRINT}, {_STORED_PRODUCT}
"""  # noqa: S608
_STORED = f"SELECT false AS claimed, {_STORED_FINGERPRINT}, {_STORED_PRODUCT}"
_ENRICH = f"""{_CLAIM}, enrichment AS (
        INSERT INTO enrichments (product_id, tenant_id, description, tags, model, created_at)
        SELECT $5::uuid, $3::uuid, $6::text, $7::json, $8::text, statement_timestamp() FROM claim
        ON CONFLICT (product_id) DO UPDATE
            SET description = excluded.description, tags = excluded.tags,
                model = excluded.model
    )
    SELECT EXISTS (SELECT 1 FROM claim) AS claimed, {_STORED_FINGERPRINT}
"""  # noqa: S608
_PROMPT = """
    SELECT p.title, p.brand, p.category,
           ARRAY(SELECT v.sku FROM variants v WHERE v.product_id = p.id) AS skus
    FROM products p WHERE p.id = $1 AND p.tenant_id = $2
"""


async def ingest_record(
    database: Database,
    tenant_id: uuid.UUID,
    product: ProductIn,
    *,
    message_id: str,
    task: str,
    fingerprint: str | None,
) -> Ingested:
    """Write one catalog record's product once per message id (see the module doc)."""
    validate_message_id(message_id)
    if database.dialect != "postgresql":
        async with database.session() as session:
            return await _ingest_in_session(
                session,
                tenant_id,
                product,
                message_id=message_id,
                task=task,
                fingerprint=fingerprint,
            )
    product_id = uuid.uuid4()
    arguments = (
        message_id,
        task,
        tenant_id,
        fingerprint,
        product_id,
        product.title,
        product.description,
        product.brand,
        product.category,
        *variant_arrays(product.variants),
    )
    # A unique violation is a SKU's: the claim conflicts silently, the ids are new.
    row = await write_product_atomically(
        database, "ingest_record", _INGEST, arguments, tenant_id, product
    )
    claim = await _settled(database, message_id, fingerprint, _claim_of(row, made=True))
    if claim.claimed:
        return Ingested(product_id, created=True)
    if claim.made is None:
        raise NotFoundError(f"message {message_id} was processed but made no product")
    return Ingested(claim.made, created=False)


async def read_for_prompt(
    database: Database, tenant_id: uuid.UUID, product_id: uuid.UUID
) -> PromptFacts | None:
    """The tenant's product as the enrichment prompt uses it; None if there is none."""
    if database.dialect != "postgresql":
        async with database.reader.connect() as connection:
            found = await connection.execute(_READ_PRODUCT, {"id": product_id, "tenant": tenant_id})
            row = found.first()
            if row is None:
                return None
            skus = list((await connection.execute(_READ_SKUS, {"id": product_id})).scalars())
        return PromptFacts(row.title, row.brand, row.category, skus)
    record = await fetch_row(database, _PROMPT, product_id, tenant_id)
    if record is None:
        return None
    return PromptFacts(record["title"], record["brand"], record["category"], list(record["skus"]))


async def store_enrichment(
    database: Database,
    tenant_id: uuid.UUID,
    product_id: uuid.UUID,
    *,
    description: str,
    tags: Sequence[str],
    model: str,
    message_id: str,
    task: str,
    fingerprint: str | None,
) -> bool:
    """Write the product's enrichment once per message id (the latest answer wins over
    an earlier message's); False when this id's was already committed."""
    validate_message_id(message_id)
    values = {
        "product_id": product_id,
        "tenant_id": tenant_id,
        "description": description,
        "tags": list(tags),
        "model": model,
    }
    if database.dialect != "postgresql":
        try:
            async with database.session() as session:
                return await _enrich_in_session(
                    session, values, message_id=message_id, task=task, fingerprint=fingerprint
                )
        except sa_exc.IntegrityError as exc:  # its foreign keys: deleted since it was read
            raise NotFoundError(f"unknown product {product_id}", field="product_id") from exc
    arguments = (
        message_id,
        task,
        tenant_id,
        fingerprint,
        product_id,
        description,
        json.dumps(list(tags)),
        model,
    )
    try:
        row = await execute_atomically(database, "store_enrichment", _ENRICH, *arguments)
    except asyncpg.ForeignKeyViolationError as exc:  # deleted since it was read
        raise NotFoundError(f"unknown product {product_id}", field="product_id") from exc
    claim = await _settled(database, message_id, fingerprint, _claim_of(row, made=False))
    return claim.claimed


def _claim_of(row: Any, *, made: bool) -> _Claim:
    return _Claim(bool(row["claimed"]), row["stored"], row["made"] if made else None)


async def _settled(
    database: Database, message_id: str, fingerprint: str | None, claim: _Claim
) -> _Claim:
    """The claim's outcome, with a twin committed after the statement's snapshot read
    again; ``ConflictingMessageIdError`` for an id committed for another payload."""
    if claim.claimed:
        return claim
    if claim.stored is None and claim.made is None:
        row = await fetch_row(database, _STORED, message_id)
        claim = _claim_of(row, made=True)
    if fingerprint is not None and claim.stored is not None and claim.stored != fingerprint:
        raise ConflictingMessageIdError(
            f"message id {message_id} was committed for another payload "
            f"(stored {claim.stored}, this one {fingerprint})",
            field="message_id",
        )
    return claim


# Elsewhere (SQLite): the same effects in one session transaction.

_READ_PRODUCT = select(Product.title, Product.brand, Product.category).where(
    Product.id == bindparam("id"), Product.tenant_id == bindparam("tenant")
)
_READ_SKUS = select(Variant.sku).where(Variant.product_id == bindparam("id"))
_ENRICHMENTS = cast(Table, Enrichment.__table__)


@transactional
async def _ingest_in_session(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    product: ProductIn,
    *,
    message_id: str,
    task: str,
    fingerprint: str | None,
) -> Ingested:
    if not await claim_message(
        session, message_id, task=task, tenant_id=tenant_id, fingerprint=fingerprint
    ):
        made = await session.scalar(
            select(ImportRecord.product_id).where(ImportRecord.message_id == message_id)
        )
        if made is None:
            raise NotFoundError(f"message {message_id} was processed but made no product")
        return Ingested(made, created=False)
    created = await create_product_with_variants(session, tenant_id, product)
    await mark_record(session, message_id, "done", product_id=created.id)
    return Ingested(created.id, created=True)


@transactional
async def _enrich_in_session(
    session: AsyncSession,
    values: dict[str, Any],
    *,
    message_id: str,
    task: str,
    fingerprint: str | None,
) -> bool:
    connection = await session.connection()
    if not await claim_message(
        connection, message_id, task=task, tenant_id=values["tenant_id"], fingerprint=fingerprint
    ):
        return False
    statement = sqlite_insert(_ENRICHMENTS).values(values)
    update = {k: statement.excluded[k] for k in ("description", "tags", "model")}
    await connection.execute(
        statement.on_conflict_do_update(index_elements=[_ENRICHMENTS.c.product_id], set_=update)
    )
    return True
