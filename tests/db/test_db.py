"""The transactional layer: the same behaviour on PostgreSQL and on the embedded SQLite."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from decimal import Decimal
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import delete, event, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from aura.catalog import (
    Base,
    Product,
    Variant,
    create_product,
    create_product_with_variants,
    create_tenant,
    parse_product,
)
from aura.db import (
    Database,
    DatabaseInbox,
    TransactionAbortedError,
    already_processed,
    claim_message,
    transactional,
)
from aura.errors import (
    ConflictError,
    ConflictingMessageIdError,
    InvalidInputError,
    NotFoundError,
)
from tests.helpers import metric


def product_data(*skus: str, title: str = "Trail shoe") -> dict[str, Any]:
    return {
        "title": title,
        "brand": "Acme",
        "variants": [
            {"sku": sku, "price": "59.90", "currency": "EUR", "attributes": {"size": 42}}
            for sku in (skus or (f"SKU-{uuid.uuid4().hex[:10]}",))
        ],
    }


async def new_tenant(database: Database) -> uuid.UUID:
    async with database.session() as session:
        tenant = await create_tenant(session, f"tenant-{uuid.uuid4().hex[:12]}")
        return tenant.id


async def count_products(database: Database, tenant_id: uuid.UUID) -> tuple[int, int]:
    async with database.session() as session:
        products = await session.scalar(
            select(func.count()).select_from(Product).where(Product.tenant_id == tenant_id)
        )
        variants = await session.scalar(
            select(func.count()).select_from(Variant).where(Variant.tenant_id == tenant_id)
        )
        return int(products or 0), int(variants or 0)


async def test_creates_a_product_with_its_variants(database: Database) -> None:
    tenant_id = await new_tenant(database)
    async with database.session() as session:
        product = await create_product_with_variants(
            session, tenant_id, product_data("A-1", "A-2", "A-3")
        )
    assert product.tenant_id == tenant_id
    assert await count_products(database, tenant_id) == (1, 3)
    async with database.session() as session:
        prices = (
            await session.scalars(select(Variant.price).where(Variant.product_id == product.id))
        ).all()
    assert prices == [Decimal("59.90")] * 3


@pytest.mark.parametrize(
    ("data", "field", "says"),
    [
        ({"variants": [{"sku": "X-1", "price": 1}]}, "title", "required field is missing"),
        (
            {"title": "T", "variants": [{"sku": "X-1", "price": "abc"}]},
            "variants.0.price",
            "decimal",
        ),
        (
            {"title": "T", "variants": [{"sku": "X-1", "price": -3}]},
            "variants.0.price",
            "greater than 0",
        ),
        ({"title": 42, "variants": [{"sku": "X-1", "price": 1}]}, "title", "valid string"),
        ({"title": "T", "variants": []}, "variants", "at least 1"),
        (
            {"title": "T", "variants": [{"sku": "D-1", "price": 1}, {"sku": "D-1", "price": 2}]},
            "variants",
            "duplicate SKU 'D-1'",
        ),
        (
            {"title": "T", "prise": 3, "variants": [{"sku": "X-1", "price": 1}]},
            "prise",
            "unknown field",
        ),
        (
            {"title": "T", "variants": [{"sku": "bad sku!", "price": 1}]},
            "variants.0.sku",
            "pattern",
        ),
    ],
)
async def test_bad_product_data_names_the_field_and_writes_nothing(
    database: Database, data: dict[str, Any], field: str, says: str
) -> None:
    tenant_id = await new_tenant(database)
    before = metric("database_transaction_rollbacks_total", reason="invalid_input")
    async with database.session() as session:
        with pytest.raises(InvalidInputError) as caught:
            await create_product_with_variants(session, tenant_id, data)
    assert caught.value.field == field
    assert says in str(caught.value)
    assert await count_products(database, tenant_id) == (0, 0)
    assert metric("database_transaction_rollbacks_total", reason="invalid_input") == before + 1


async def test_non_object_product_data_is_refused(database: Database) -> None:
    tenant_id = await new_tenant(database)
    async with database.session() as session:
        with pytest.raises(InvalidInputError, match="expected a JSON object, got list"):
            await create_product_with_variants(session, tenant_id, [1, 2])  # type: ignore[arg-type]


async def test_a_sku_already_used_by_the_tenant_is_a_conflict(database: Database) -> None:
    tenant_id = await new_tenant(database)
    async with database.session() as session:
        await create_product_with_variants(session, tenant_id, product_data("S-1"))
    async with database.session() as session:
        with pytest.raises(ConflictError, match="'S-1'"):
            await create_product_with_variants(session, tenant_id, product_data("S-2", "S-1"))
    assert await count_products(database, tenant_id) == (1, 1)
    other_tenant = await new_tenant(database)  # SKUs are unique per tenant, not globally
    async with database.session() as session:
        await create_product_with_variants(session, other_tenant, product_data("S-1"))


async def test_unknown_tenant_is_not_found(database: Database) -> None:
    async with database.session() as session:
        with pytest.raises(NotFoundError, match="unknown tenant"):
            await create_product_with_variants(session, uuid.uuid4(), product_data())


async def test_nested_calls_commit_once(database: Database) -> None:
    tenant_id = await new_tenant(database)

    @transactional
    async def two_products(session: AsyncSession, tenant: uuid.UUID) -> None:
        await create_product_with_variants(session, tenant, product_data())
        await create_product_with_variants(session, tenant, product_data())

    commits: list[object] = []
    async with database.session() as session:
        event.listen(session.sync_session, "after_commit", commits.append)
        await two_products(session, tenant_id)
    assert len(commits) == 1
    assert await count_products(database, tenant_id) == (2, 2)


async def test_an_inner_failure_rolls_back_the_outer_transaction(database: Database) -> None:
    tenant_id = await new_tenant(database)

    @transactional
    async def outer(session: AsyncSession, tenant: uuid.UUID) -> None:
        await create_product_with_variants(session, tenant, product_data("N-1"))
        await create_product_with_variants(session, tenant, product_data("N-1"))  # conflict

    async with database.session() as session:
        with pytest.raises(ConflictError):
            await outer(session, tenant_id)
    assert await count_products(database, tenant_id) == (0, 0)


async def test_an_outer_call_cannot_commit_after_swallowing_an_inner_failure(
    database: Database,
) -> None:
    tenant_id = await new_tenant(database)

    @transactional
    async def careless(session: AsyncSession, tenant: uuid.UUID) -> None:
        await create_product_with_variants(session, tenant, product_data())
        with contextlib.suppress(InvalidInputError):  # the transaction is doomed all the same
            await create_product_with_variants(session, tenant, {"title": "no variants"})

    async with database.session() as session:
        with pytest.raises(TransactionAbortedError, match="careless"):
            await careless(session, tenant_id)
    assert await count_products(database, tenant_id) == (0, 0)


async def test_other_errors_roll_back_and_pass_through_unchanged(database: Database) -> None:
    tenant_id = await new_tenant(database)
    before = metric("database_transaction_rollbacks_total", reason="application_error")

    class Boom(Exception):
        pass

    @transactional
    async def half_done(session: AsyncSession, tenant: uuid.UUID) -> None:
        await create_product(session, tenant, product_data())
        raise Boom("after the product, before the variants")

    async with database.session() as session:
        with pytest.raises(Boom):
            await half_done(session, tenant_id)
    assert await count_products(database, tenant_id) == (0, 0)
    assert metric("database_transaction_rollbacks_total", reason="application_error") == (
        before + 1
    )


@transactional
async def ingest_once(
    session: AsyncSession, tenant_id: uuid.UUID, data: dict[str, Any], *, message_id: str
) -> Product | None:
    """What a task does: claim the message id and make the effect in one transaction."""
    if not await claim_message(session, message_id, task="ingest_product", tenant_id=tenant_id):
        return None
    return await create_product_with_variants(session, tenant_id, data)


async def test_the_inbox_makes_a_redelivered_message_a_no_op(database: Database) -> None:
    tenant_id = await new_tenant(database)
    message_id = str(uuid.uuid4())
    data = product_data()
    async with database.session() as session:
        assert await ingest_once(session, tenant_id, data, message_id=message_id) is not None
    async with database.session() as session:
        assert await ingest_once(session, tenant_id, data, message_id=message_id) is None
        assert await already_processed(session, message_id)
    assert await count_products(database, tenant_id) == (1, 1)


async def test_a_failed_effect_leaves_the_message_unclaimed(database: Database) -> None:
    tenant_id = await new_tenant(database)
    message_id = str(uuid.uuid4())
    async with database.session() as session:
        with pytest.raises(InvalidInputError):
            await ingest_once(session, tenant_id, {"title": "x"}, message_id=message_id)
        assert not await already_processed(session, message_id)


async def test_concurrent_deliveries_of_one_message_make_one_effect(database: Database) -> None:
    tenant_id = await new_tenant(database)
    message_id = str(uuid.uuid4())
    data = product_data()

    async def deliver() -> Product | None:
        async with database.session() as session:
            return await ingest_once(session, tenant_id, data, message_id=message_id)

    results = await asyncio.gather(*(deliver() for _ in range(4)), return_exceptions=True)
    made = [r for r in results if isinstance(r, Product)]
    assert len(made) == 1, results
    assert all(r is None or isinstance(r, Product) for r in results), results
    assert await count_products(database, tenant_id) == (1, 1)


async def test_more_transactions_than_connections_complete_without_leaks(
    database: Database,
) -> None:
    small = Database(database.url, pool_size=2, max_overflow=1)
    tenant_id = await new_tenant(database)
    gauge_before = metric("sqlalchemy_pool_connections_active")

    async def one() -> None:
        async with small.session() as session:
            await create_product_with_variants(session, tenant_id, product_data())

    try:
        await asyncio.gather(*(one() for _ in range(25)))
        assert small.checked_out() == 0
        assert metric("sqlalchemy_pool_connections_active") == gauge_before
    finally:
        await small.dispose()
    assert await count_products(database, tenant_id) == (25, 25)


async def test_migrations_match_the_models(database: Database) -> None:
    async with database.engine.connect() as connection:
        differences = await connection.run_sync(
            lambda sync: compare_metadata(MigrationContext.configure(sync), Base.metadata)
        )
    assert differences == []


async def test_a_core_connection_claims_commits_and_rolls_back_like_a_session(
    database: Database,
) -> None:
    """``@transactional`` and ``claim_message`` on ``engine.connect()`` (the leaner path a
    task with Core statements takes); the inbox reads what was committed."""
    message_id = str(uuid.uuid4())
    inbox = DatabaseInbox(lambda: database)

    @transactional
    async def claim(connection: AsyncConnection, fingerprint: str, *, fail: bool) -> bool:
        claimed = await claim_message(connection, message_id, task="t", fingerprint=fingerprint)
        if fail:
            raise RuntimeError("after the claim, before the commit")
        return claimed

    async with database.engine.connect() as connection:
        with pytest.raises(RuntimeError):
            await claim(connection, "a" * 64, fail=True)
    assert await inbox.lookup(message_id) is None  # rolled back with the effect
    async with database.engine.connect() as connection:
        assert await claim(connection, "a" * 64, fail=False)
    entry = await inbox.lookup(message_id)
    assert entry is not None
    assert entry.matches("a" * 64)
    async with database.engine.connect() as connection:
        assert not await claim(connection, "a" * 64, fail=False)  # a twin: no effect
        with pytest.raises(ConflictingMessageIdError):
            await claim(connection, "b" * 64, fail=False)
    assert database.checked_out() == 0


async def test_a_product_with_its_message_is_written_whole_or_not_at_all(
    database: Database,
) -> None:
    from aura.catalog.products import create_product_with_message
    from aura.db import Claim, OutboxMessage, Staged

    tenant_id = await new_tenant(database)

    def message(product_id: uuid.UUID) -> Staged:
        return Staged(
            f"enrich-{product_id}", tenant_id, "aura.enrich_product", "realtime_queue", ["a"], {}
        )

    async def outbox_rows() -> int:
        async with database.session() as session:
            found = await session.scalar(
                select(func.count())
                .select_from(OutboxMessage)
                .where(OutboxMessage.tenant_id == tenant_id)
            )
        return int(found or 0)

    claim = Claim.new(60)
    made = await create_product_with_message(
        database, tenant_id, parse_product(product_data("W-1", "W-2")), message, claim
    )
    assert await count_products(database, tenant_id) == (1, 2)
    assert await outbox_rows() == 1
    async with database.session() as session:
        row = await session.get(OutboxMessage, f"enrich-{made.id}")
        assert row is not None
        assert (row.args, row.claimed_by) == (["a"], claim.owner)
    before = metric("database_transaction_rollbacks_total", reason="invalid_input")
    with pytest.raises(ConflictError, match="'W-2'") as caught:
        await create_product_with_message(
            database, tenant_id, parse_product(product_data("W-3", "W-2")), message, claim
        )
    assert caught.value.field == "variants"
    with pytest.raises(NotFoundError, match="unknown tenant"):
        await create_product_with_message(
            database, uuid.uuid4(), parse_product(product_data("W-9")), message, claim
        )
    assert metric("database_transaction_rollbacks_total", reason="invalid_input") == before + 2
    assert await count_products(database, tenant_id) == (1, 2)  # nothing of either
    assert await outbox_rows() == 1
    async with database.session() as session:  # no other test's relay may send it
        await session.execute(delete(OutboxMessage).where(OutboxMessage.tenant_id == tenant_id))
        await session.commit()
