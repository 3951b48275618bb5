"""The worker's one-statement writes (aura.catalog.pipeline) keep the inbox's promise.

Invariant, for every delivery whatever came before it: a message id's effect is committed
once (its product with all its variants, its import record done, its claim) or not at
all; a redelivery of the same payload answers with the product already made and writes
nothing; the same id with another payload, a taken SKU, an unknown tenant, a NUL or a
connection that dies mid-statement write nothing half-way. Each runs on PostgreSQL (one
statement) and SQLite (a session transaction), except where a fault is PostgreSQL's.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, func, select

import aura.catalog.pipeline
from aura.catalog import (
    Enrichment,
    ImportRecord,
    Product,
    ProductIn,
    Variant,
    create_import,
    parse_product,
)
from aura.catalog.pipeline import ingest_record, read_for_prompt, store_enrichment
from aura.db import Database, DatabaseTransactionError, ProcessedMessage
from aura.errors import ConflictError, ConflictingMessageIdError, NotFoundError
from aura.messaging._poison import PoisonPillDetector
from tests.db.test_db import count_products, new_tenant, product_data

INGEST, ENRICH = "aura.ingest_product", "aura.enrich_product"


def record(*skus: str, title: str = "Trail shoe") -> ProductIn:
    return parse_product(product_data(*skus, title=title))


async def message_ids(database: Database, tenant_id: uuid.UUID, count: int) -> list[str]:
    async with database.session() as session:
        _, ids = await create_import(session, tenant_id, count)
        await session.commit()
    return ids


async def statuses(database: Database, ids: list[str]) -> dict[str, tuple[str, Any]]:
    async with database.session() as session:
        rows = await session.execute(
            select(ImportRecord.message_id, ImportRecord.status, ImportRecord.product_id).where(
                ImportRecord.message_id.in_(ids)
            )
        )
        return {m: (s, p) for m, s, p in rows.all()}


async def claims(database: Database, ids: list[str]) -> dict[str, str | None]:
    async with database.session() as session:
        rows = await session.execute(
            select(ProcessedMessage.message_id, ProcessedMessage.fingerprint).where(
                ProcessedMessage.message_id.in_(ids)
            )
        )
        return {m: f for m, f in rows.all()}


async def test_a_record_is_written_once_whatever_the_redeliveries(database: Database) -> None:
    tenant_id = await new_tenant(database)
    [message_id] = await message_ids(database, tenant_id, 1)
    data = record("ONCE-1", "ONCE-2")
    first = await ingest_record(
        database, tenant_id, data, message_id=message_id, task=INGEST, fingerprint="f1"
    )
    assert first.created
    for _ in range(3):
        again = await ingest_record(
            database, tenant_id, data, message_id=message_id, task=INGEST, fingerprint="f1"
        )
        assert again.product_id == first.product_id
        assert not again.created
    assert await count_products(database, tenant_id) == (1, 2)
    assert await statuses(database, [message_id]) == {message_id: ("done", first.product_id)}
    assert await claims(database, [message_id]) == {message_id: "f1"}


async def test_the_same_id_with_another_payload_is_a_conflict(database: Database) -> None:
    tenant_id = await new_tenant(database)
    [message_id] = await message_ids(database, tenant_id, 1)
    await ingest_record(
        database, tenant_id, record("X-1"), message_id=message_id, task=INGEST, fingerprint="a"
    )
    with pytest.raises(ConflictingMessageIdError):
        await ingest_record(
            database, tenant_id, record("X-2"), message_id=message_id, task=INGEST, fingerprint="b"
        )
    assert await count_products(database, tenant_id) == (1, 1)


async def test_a_taken_sku_is_named_and_nothing_is_written(database: Database) -> None:
    tenant_id = await new_tenant(database)
    first, second = await message_ids(database, tenant_id, 2)
    await ingest_record(
        database, tenant_id, record("TAKEN"), message_id=first, task=INGEST, fingerprint="a"
    )
    with pytest.raises(ConflictError, match="'TAKEN'"):
        await ingest_record(
            database,
            tenant_id,
            record("FREE", "TAKEN"),
            message_id=second,
            task=INGEST,
            fingerprint="b",
        )
    assert await count_products(database, tenant_id) == (1, 1)
    assert (await statuses(database, [second]))[second] == ("pending", None)
    assert await claims(database, [second]) == {}  # a later delivery may still succeed


async def test_an_unknown_tenant_is_not_found_and_nothing_is_written(database: Database) -> None:
    stranger = uuid.uuid4()
    message_id = str(uuid.uuid4())
    with pytest.raises(NotFoundError):
        await ingest_record(
            database, stranger, record(), message_id=message_id, task=INGEST, fingerprint="a"
        )
    assert await claims(database, [message_id]) == {}


async def test_a_nul_in_a_field_is_poison_and_writes_nothing(pg_database: Database) -> None:
    tenant_id = await new_tenant(pg_database)
    [message_id] = await message_ids(pg_database, tenant_id, 1)
    with pytest.raises(asyncpg.PostgresError) as caught:
        await ingest_record(
            pg_database,
            tenant_id,
            record(title="nul \x00 inside"),
            message_id=message_id,
            task=INGEST,
            fingerprint="a",
        )
    assert PoisonPillDetector().is_poison_pill(caught.value)
    assert await count_products(pg_database, tenant_id) == (0, 0)
    assert await claims(pg_database, [message_id]) == {}


async def test_twin_deliveries_at_once_make_one_product(database: Database) -> None:
    """The second claim waits for the first; the snapshot it read before has no row for
    the id, so the product is read again (the twin path of ``_settled``)."""
    tenant_id = await new_tenant(database)
    ids = await message_ids(database, tenant_id, 5)
    for message_id in ids:
        data = record(f"TWIN-{message_id}")
        outcomes = await asyncio.gather(
            *(
                ingest_record(
                    database, tenant_id, data, message_id=message_id, task=INGEST, fingerprint="f"
                )
                for _ in range(3)
            )
        )
        assert sum(o.created for o in outcomes) == 1
        assert len({o.product_id for o in outcomes}) == 1
    assert await count_products(database, tenant_id) == (5, 5)


async def test_a_backend_that_dies_mid_statement_leaves_all_or_nothing(
    pg_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ingest statement, with its own backend terminated inside it: the outcome is
    unknown to the caller, the database holds all of it or none, and the redelivery
    settles it either way."""
    tenant_id = await new_tenant(pg_database)
    [message_id] = await message_ids(pg_database, tenant_id, 1)
    data = record("DIES-1", "DIES-2")
    dying = aura.catalog.pipeline._INGEST.replace(
        "    SELECT EXISTS (SELECT 1 FROM claim) AS claimed,",
        "    SELECT (SELECT pg_terminate_backend(pg_backend_pid()) FROM product) AS died,"
        " EXISTS (SELECT 1 FROM claim) AS claimed,",
    )
    assert dying != aura.catalog.pipeline._INGEST
    monkeypatch.setattr(aura.catalog.pipeline, "_INGEST", dying)
    with pytest.raises(DatabaseTransactionError) as caught:
        await ingest_record(
            pg_database, tenant_id, data, message_id=message_id, task=INGEST, fingerprint="f"
        )
    assert caught.value.commit_outcome_unknown
    assert await count_products(pg_database, tenant_id) in {(0, 0), (1, 2)}
    monkeypatch.undo()
    settled = await ingest_record(
        pg_database, tenant_id, data, message_id=message_id, task=INGEST, fingerprint="f"
    )
    assert await count_products(pg_database, tenant_id) == (1, 2)
    assert await statuses(pg_database, [message_id]) == {message_id: ("done", settled.product_id)}
    assert pg_database.checked_out() == 0


# Any sequence of deliveries: ids from a small pool (redeliveries), two payloads per id
# (conflicts), SKUs from a small pool (taken SKUs). The model says what each returns.
_deliveries = st.lists(
    st.tuples(
        st.integers(0, 3),  # which message id
        st.sampled_from(["a", "b"]),  # which payload (its fingerprint)
        st.lists(
            st.sampled_from(["S1", "S2", "S3", "S4", "S5"]), min_size=1, max_size=3, unique=True
        ),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=40, deadline=None)
@given(deliveries=_deliveries)
async def test_any_sequence_of_deliveries_matches_the_model(
    pg_database: Database, deliveries: list[tuple[int, str, list[str]]]
) -> None:
    database = pg_database
    tenant_id = await new_tenant(database)
    ids = await message_ids(database, tenant_id, 4)
    committed: dict[str, tuple[str, uuid.UUID, list[str]]] = {}
    for index, fingerprint, skus in deliveries:
        message_id = ids[index]
        taken = {s for _, _, used in committed.values() for s in used}
        call = ingest_record(
            database,
            tenant_id,
            record(*skus),
            message_id=message_id,
            task=INGEST,
            fingerprint=fingerprint,
        )
        if message_id in committed:
            stored, product_id, _ = committed[message_id]
            if stored != fingerprint:
                with pytest.raises(ConflictingMessageIdError):
                    await call
            else:
                assert await call == aura.catalog.pipeline.Ingested(product_id, created=False)
        elif taken & set(skus):
            with pytest.raises(ConflictError):
                await call
        else:
            made = await call
            assert made.created
            committed[message_id] = (fingerprint, made.product_id, skus)
    variants = sum(len(skus) for _, _, skus in committed.values())
    assert await count_products(database, tenant_id) == (len(committed), variants)
    assert await claims(database, ids) == {m: f for m, (f, _, _) in committed.items()}
    expected: dict[str, tuple[str, Any]] = {m: ("pending", None) for m in ids}
    expected |= {m: ("done", p) for m, (_, p, _) in committed.items()}
    assert await statuses(database, ids) == expected


async def test_read_for_prompt_reads_the_tenants_product_only(database: Database) -> None:
    tenant_id = await new_tenant(database)
    [message_id] = await message_ids(database, tenant_id, 1)
    made = await ingest_record(
        database,
        tenant_id,
        record("P-1", "P-2"),
        message_id=message_id,
        task=INGEST,
        fingerprint="f",
    )
    facts = await read_for_prompt(database, tenant_id, made.product_id)
    assert facts is not None
    assert (facts.title, facts.brand, sorted(facts.skus)) == ("Trail shoe", "Acme", ["P-1", "P-2"])
    assert await read_for_prompt(database, await new_tenant(database), made.product_id) is None
    assert await read_for_prompt(database, tenant_id, uuid.uuid4()) is None


async def enrichment_of(database: Database, product_id: uuid.UUID) -> tuple[str, list[str]] | None:
    async with database.session() as session:
        row = await session.execute(
            select(Enrichment.description, Enrichment.tags).where(
                Enrichment.product_id == product_id
            )
        )
        found = row.first()
        return None if found is None else (found[0], list(found[1]))


async def test_an_enrichment_is_stored_once_per_message(database: Database) -> None:
    tenant_id = await new_tenant(database)
    [message_id] = await message_ids(database, tenant_id, 1)
    made = await ingest_record(
        database, tenant_id, record(), message_id=message_id, task=INGEST, fingerprint="f"
    )
    enrich_id = f"enrich-{made.product_id}"

    async def store(description: str, fingerprint: str, message: str = enrich_id) -> bool:
        return await store_enrichment(
            database,
            tenant_id,
            made.product_id,
            description=description,
            tags=["trail"],
            model="sim",
            message_id=message,
            task=ENRICH,
            fingerprint=fingerprint,
        )

    assert await store("first", "e1")
    assert not await store("again", "e1")  # redelivered: its effect stays the first's
    assert await enrichment_of(database, made.product_id) == ("first", ["trail"])
    with pytest.raises(ConflictingMessageIdError):
        await store("other", "e2")
    assert await store("newer", "e3", message=f"again-{made.product_id}")  # another message
    assert await enrichment_of(database, made.product_id) == ("newer", ["trail"])
    async with database.session() as session:
        count = await session.scalar(
            select(func.count()).select_from(Enrichment).where(Enrichment.tenant_id == tenant_id)
        )
    assert count == 1


async def test_an_enrichment_of_a_deleted_product_is_not_found(database: Database) -> None:
    tenant_id = await new_tenant(database)
    [message_id] = await message_ids(database, tenant_id, 1)
    made = await ingest_record(
        database, tenant_id, record(), message_id=message_id, task=INGEST, fingerprint="f"
    )
    async with database.session() as session:
        await session.execute(delete(Variant).where(Variant.product_id == made.product_id))
        await session.execute(delete(Product).where(Product.id == made.product_id))
        await session.commit()
    enrich_id = f"enrich-{made.product_id}"
    with pytest.raises(NotFoundError):
        await store_enrichment(
            database,
            tenant_id,
            made.product_id,
            description="d",
            tags=[],
            model="sim",
            message_id=enrich_id,
            task=ENRICH,
            fingerprint="e",
        )
    assert await claims(database, [enrich_id]) == {}
