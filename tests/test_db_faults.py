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

import aura.db.products
from aura.db import (
    Database,
    DatabaseTransactionError,
    create_product_with_variants,
    is_network_error,
)
from tests import services
from tests.helpers import metric, wait_until
from tests.test_db import count_products, ingest_once, new_tenant, product_data

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
    real_create_variants = aura.db.products.create_variants
    killed: list[int] = []

    async def kill_then_create_variants(session: AsyncSession, *args: Any, **kwargs: Any) -> Any:
        pid = await backend_pid(session)
        assert await admin.fetchval("select pg_terminate_backend($1)", pid)
        killed.append(pid)
        return await real_create_variants(session, *args, **kwargs)

    monkeypatch.setattr(aura.db.products, "create_variants", kill_then_create_variants)
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
    monkeypatch.setattr(aura.db.products, "create_variants", real_create_variants)
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


async def _backend_gone(admin: asyncpg.Connection, pid: int) -> bool:
    return not await admin.fetchval("select count(*) from pg_stat_activity where pid = $1", pid)


async def test_a_connection_idle_past_ping_after_idle_is_pinged_and_replaced(
    pg_url: str, admin: asyncpg.Connection
) -> None:
    database = Database(pg_url, pool_size=1, max_overflow=0, ping_after_idle=0.0)
    try:
        async with database.engine.connect() as connection:
            pid = await connection.scalar(text("select pg_backend_pid()"))
        assert await admin.fetchval("select pg_terminate_backend($1)", pid)
        await wait_until(lambda: _backend_gone(admin, pid), within=10)
        async with database.engine.connect() as connection:  # the ping finds it dropped
            assert await connection.scalar(text("select pg_backend_pid()")) != pid
    finally:
        await database.dispose()


async def test_a_connection_used_within_ping_after_idle_is_not_pinged(
    pg_url: str, admin: asyncpg.Connection
) -> None:
    """The failure accepted for skipping the ping: a connection the server dropped less
    than ``ping_after_idle`` after its last use fails its first statement, as a network
    error; that invalidates the pool, and the next checkout connects afresh."""
    database = Database(pg_url, pool_size=1, max_overflow=0, ping_after_idle=3600.0)
    try:
        async with database.engine.connect() as connection:
            pid = await connection.scalar(text("select pg_backend_pid()"))
        assert await admin.fetchval("select pg_terminate_backend($1)", pid)
        await wait_until(lambda: _backend_gone(admin, pid), within=10)
        with pytest.raises(Exception) as caught:  # noqa: PT011 - the driver's class varies
            async with database.engine.connect() as connection:
                await connection.scalar(text("select 1"))
        assert is_network_error(caught.value)
        async with database.engine.connect() as connection:
            assert await connection.scalar(text("select pg_backend_pid()")) != pid
        assert database.checked_out() == 0
    finally:
        await database.dispose()
