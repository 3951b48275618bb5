"""Real network failures on real PostgreSQL: backends killed mid-transaction and mid-COMMIT."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

import aura.catalog.products
from aura.catalog import create_product_with_variants
from aura.db import Database, DatabaseTransactionError
from tests import services
from tests.db.test_db import count_products, ingest_once, new_tenant, product_data
from tests.helpers import metric, wait_until

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def admin() -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(services.pg_test_url("postgresql"))
    yield connection
    await connection.close()


async def backend_pid(session: AsyncSession) -> int:
    pid = await session.scalar(text("select pg_backend_pid()"))
    assert isinstance(pid, int)
    return pid


async def test_backend_killed_between_product_and_variants(
    pg_database: Database, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant_id = await new_tenant(pg_database)
    real_create_variants = aura.catalog.products.create_variants
    killed: list[int] = []

    async def kill_then_create_variants(session: AsyncSession, *args: Any, **kwargs: Any) -> Any:
        pid = await backend_pid(session)
        assert await admin.fetchval("select pg_terminate_backend($1)", pid)
        killed.append(pid)
        return await real_create_variants(session, *args, **kwargs)

    monkeypatch.setattr(aura.catalog.products, "create_variants", kill_then_create_variants)
    before = metric("database_transaction_rollbacks_total", reason="network_error")
    with structlog.testing.capture_logs() as logged:
        async with pg_database.session() as session:
            with pytest.raises(DatabaseTransactionError) as caught:
                await create_product_with_variants(session, tenant_id, product_data())
    assert killed, "the fault was not injected"
    assert not caught.value.commit_outcome_unknown
    assert isinstance(caught.value.__cause__, Exception)
    assert await count_products(pg_database, tenant_id) == (0, 0)
    assert metric("database_transaction_rollbacks_total", reason="network_error") == before + 1
    critical = [entry for entry in logged if entry["log_level"] == "critical"]
    assert len(critical) == 1
    assert "rollback" in critical[0]["event"]  # what the seed's `grep "rollback"` finds
    assert critical[0]["function"] == "create_product_with_variants"
    # asyncpg's words depend on when the kill lands ("connection is closed", "... closed in
    # the middle of operation", "cannot switch to state ..."): the driver's first line is
    # logged, never SQLAlchemy's statement and its parameters.
    assert critical[0]["error"]
    assert "[SQL" not in critical[0]["error"]
    assert "parameters" not in critical[0]["error"]

    # The pool recovers: the next call gets a fresh connection and succeeds.
    monkeypatch.setattr(aura.catalog.products, "create_variants", real_create_variants)
    async with pg_database.session() as session:
        await create_product_with_variants(session, tenant_id, product_data())
    assert await count_products(pg_database, tenant_id) == (1, 1)
    assert pg_database.checked_out() == 0


@pytest.fixture
async def slow_commit(admin: asyncpg.Connection) -> AsyncIterator[str]:
    """A deferred trigger that makes COMMIT of a product titled 'slow-commit' take 1 s."""
    await admin.execute(
        """
        create or replace function aura_test_slow_commit() returns trigger
        language plpgsql as $$ begin perform pg_sleep(1); return null; end $$;
        create constraint trigger aura_test_slow_commit after insert on products
        deferrable initially deferred for each row when (new.title = 'slow-commit')
        execute function aura_test_slow_commit();
        """
    )
    yield "slow-commit"
    await admin.execute("drop trigger aura_test_slow_commit on products")


async def wait_for_commit(admin: asyncpg.Connection, pids: list[int]) -> None:
    """Until the backend in ``pids`` (filled in by the transaction) is running COMMIT."""

    async def committing() -> bool:
        if not pids:
            return False
        query = await admin.fetchval("select query from pg_stat_activity where pid=$1", pids[0])
        return str(query).strip().upper().startswith("COMMIT")

    await wait_until(committing, within=10)


async def kill_when_committing(admin: asyncpg.Connection, pids: list[int]) -> None:
    await wait_for_commit(admin, pids)
    assert await admin.fetchval("select pg_terminate_backend($1)", pids[0])


async def test_backend_killed_during_commit_is_all_or_nothing_and_retry_is_safe(
    pg_database: Database, admin: asyncpg.Connection, slow_commit: str
) -> None:
    tenant_id = await new_tenant(pg_database)
    message_id = str(uuid.uuid4())
    data = product_data("C-1", "C-2", title=slow_commit)
    pids: list[int] = []

    async def deliver(record_pid: Callable[[int], None] | None = None) -> Awaitable[Any]:
        async with pg_database.session() as session:
            if record_pid is not None:
                record_pid(await backend_pid(session))
            return await ingest_once(session, tenant_id, data, message_id=message_id)

    killer = asyncio.create_task(kill_when_committing(admin, pids))
    with pytest.raises(DatabaseTransactionError) as caught:
        await deliver(pids.append)
    await killer
    assert caught.value.commit_outcome_unknown
    assert "COMMIT outcome is unknown" in str(caught.value)
    assert await count_products(pg_database, tenant_id) in {(0, 0), (1, 2)}  # all or nothing

    # Redelivery of the same message: the inbox decides, and there is exactly one product.
    await deliver()
    assert await count_products(pg_database, tenant_id) == (1, 2)
    await deliver()
    assert await count_products(pg_database, tenant_id) == (1, 2)
    assert pg_database.checked_out() == 0


async def test_a_cancelled_transaction_rolls_back_and_returns_its_connection(
    pg_database: Database, admin: asyncpg.Connection, slow_commit: str
) -> None:
    tenant_id = await new_tenant(pg_database)
    pids: list[int] = []

    async def create() -> None:
        async with pg_database.session() as session:
            pids.append(await backend_pid(session))
            await create_product_with_variants(session, tenant_id, product_data(title=slow_commit))

    before = metric("database_transaction_rollbacks_total", reason="application_error")
    task = asyncio.create_task(create())
    await wait_for_commit(admin, pids)
    task.cancel()  # what the soft time limit does to an async task
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: _async(pg_database.checked_out() == 0), within=10)
    assert metric("database_transaction_rollbacks_total", reason="application_error") == before + 1
    assert await count_products(pg_database, tenant_id) in {(0, 0), (1, 1)}


async def _async(value: bool) -> bool:
    return value


# The gateway's one-statement write (create_product_with_message): its backend ends in the
# middle of the statement. Every placeholder is used, so the statement is sent as the real
# one is; the server then terminates its own backend.
_SUICIDE = (
    "SELECT pg_terminate_backend(pg_backend_pid()) FROM (SELECT $1::uuid, $2::uuid, $3::text,"
    " $4::text, $5::text, $6::text, $7::timestamptz, $8::text, $9::text, $10::text,"
    " $11::text, $12::text, $13::text, $14::timestamptz, $15::uuid[], $16::text[],"
    " $17::numeric[], $18::text[], $19::text[]) AS a"
)


async def test_a_one_statement_write_whose_backend_dies_reports_an_unknown_outcome(
    pg_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aura.catalog import parse_product
    from aura.catalog.products import create_product_with_message
    from aura.db import Claim, Staged

    tenant_id = await new_tenant(pg_database)
    data = parse_product(product_data("ONE-1"))

    def message(product_id: uuid.UUID) -> Staged:
        return Staged(
            f"enrich-{product_id}", tenant_id, "aura.enrich_product", "realtime_queue", [], {}
        )

    monkeypatch.setattr(aura.catalog.products, "_WITH_MESSAGE", _SUICIDE)
    before = metric("database_transaction_rollbacks_total", reason="network_error")
    with (
        structlog.testing.capture_logs() as logged,
        pytest.raises(DatabaseTransactionError) as caught,
    ):
        await create_product_with_message(pg_database, tenant_id, data, message, Claim.new(60))
    assert caught.value.commit_outcome_unknown  # one statement: it commits as it ends
    assert metric("database_transaction_rollbacks_total", reason="network_error") == before + 1
    critical = [e for e in logged if e["log_level"] == "critical"]
    assert [e["function"] for e in critical] == ["create_product_with_message"]
    assert "[SQL" not in critical[0]["error"]
    assert pg_database.checked_out() == 0

    monkeypatch.undo()  # the pool recovers: the next write gets a live connection
    made = await create_product_with_message(pg_database, tenant_id, data, message, Claim.new(60))
    assert made.tenant_id == tenant_id
    assert await count_products(pg_database, tenant_id) == (1, 1)
    async with pg_database.session() as session:  # no other test's relay may send it
        await session.execute(text("DELETE FROM outbox WHERE tenant_id = :t"), {"t": tenant_id})
        await session.commit()


async def test_a_one_statement_write_waits_out_a_connection_blip(pg_url: str) -> None:
    """Every connection cut and new ones refused for a moment (aura chaos net-cut): a
    statement that has not been sent waits for a connection (``CONNECT_PATIENCE``)
    instead of failing its task after the LLM call is made; past it, the outage is
    raised as it came (for the worker's outage gate), and nothing was counted as a
    rollback, since nothing was sent."""
    from aura.chaos.proxy import NetworkProxies, proxied_url
    from aura.db import execute_atomically, is_outage

    with NetworkProxies() as hub:
        proxy = hub.add("postgres", pg_url, postgres=True)
        database = Database(proxied_url(pg_url, proxy.port), pool_size=2, connect_timeout=2)
        healing: asyncio.Task[None] | None = None
        try:
            assert await execute_atomically(database, "probe", "SELECT 1") is not None
            before = metric("database_transaction_rollbacks_total", reason="network_error")
            # No pooled connection (a pooled one the cut resets mid-statement is a network
            # rollback, another test's case): the statement must get a new one.
            await database.engine.dispose()
            await asyncio.to_thread(proxy.cut)  # new connections refused

            async def heal_soon() -> None:
                await asyncio.sleep(0.6)
                await asyncio.to_thread(proxy.heal)

            healing = asyncio.create_task(heal_soon())
            row = await execute_atomically(database, "blip", "SELECT 42")
            await healing
            assert row is not None
            assert row[0] == 42
            assert metric("database_transaction_rollbacks_total", reason="network_error") == before

            await database.engine.dispose()  # no pooled connection: each must be made
            await asyncio.to_thread(proxy.cut)
            with pytest.raises(Exception) as caught:  # noqa: PT011 - the driver's own error
                await execute_atomically(database, "outage", "SELECT 1")
            assert is_outage(caught.value)
            assert not isinstance(caught.value, DatabaseTransactionError)
        finally:
            if healing is not None and not healing.done():  # never left to a closed hub
                await asyncio.wait({healing}, timeout=10)
            await asyncio.to_thread(proxy.heal)
            await database.dispose()
