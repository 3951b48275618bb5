"""``@transactional`` pinned where a user would notice a change (found by
scripts/mutation.py): two top-level calls in a row, deep nesting, a rollback that fails
itself, cancellation, what counts as a network failure and what the error then says."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from structlog.testing import capture_logs

from aura.catalog import Tenant
from aura.db import Database, describe_error, is_network_error, transactional
from aura.errors import DatabaseTransactionError, InvalidInputError
from tests.helpers import metric

ROLLBACKS = "database_transaction_rollbacks_total"


@transactional
async def add_tenant(session: AsyncSession, name: str) -> str:
    session.add(Tenant(name=name))
    await session.flush()
    return name


async def tenants_named(database: Database, *names: str) -> int:
    async with database.session() as session:
        found = await session.scalar(
            select(func.count()).select_from(Tenant).where(Tenant.name.in_(names))
        )
        return int(found or 0)


def unique(label: str) -> str:
    return f"pins-{label}-{uuid.uuid4().hex[:12]}"


async def test_two_top_level_calls_in_a_row_on_one_session_both_commit(
    database: Database,
) -> None:
    first, second = unique("first"), unique("second")
    async with database.session() as session:
        assert await add_tenant(session, first) == first
        assert session.info["aura.transaction_depth"] == 0
        assert await add_tenant(session, second) == second
    assert await tenants_named(database, first, second) == 2


async def test_a_call_after_a_failed_one_on_the_same_session_commits(pg_database: Database) -> None:
    @transactional
    async def fails(session: AsyncSession) -> None:
        raise InvalidInputError("refused")

    name = unique("after-failure")
    async with pg_database.session() as session:
        with pytest.raises(InvalidInputError):
            await fails(session)
        await add_tenant(session, name)
    assert await tenants_named(pg_database, name) == 1


async def test_three_levels_deep_still_join_the_outermost(pg_database: Database) -> None:
    names = [unique(f"deep{i}") for i in range(3)]

    @transactional
    async def innermost(session: AsyncSession) -> None:
        await add_tenant(session, names[2])

    @transactional
    async def inner(session: AsyncSession) -> None:
        await add_tenant(session, names[0])
        await add_tenant(session, names[1])
        await innermost(session)

    @transactional
    async def outer(session: AsyncSession) -> None:
        await inner(session)
        raise RuntimeError("the outer call fails after the inner ones returned")

    async with pg_database.session() as session:
        with pytest.raises(RuntimeError):
            await outer(session)
    assert await tenants_named(pg_database, *names) == 0  # no inner call committed


async def test_invalid_input_and_other_errors_count_their_own_reason(
    pg_database: Database,
) -> None:
    @transactional
    async def refuses(session: AsyncSession) -> None:
        raise InvalidInputError("bad field")

    @transactional
    async def breaks(session: AsyncSession) -> None:
        raise KeyError("k")

    invalid = metric(ROLLBACKS, reason="invalid_input")
    other = metric(ROLLBACKS, reason="application_error")
    async with pg_database.session() as session:
        with pytest.raises(InvalidInputError):
            await refuses(session)
        assert metric(ROLLBACKS, reason="invalid_input") == invalid + 1
        assert metric(ROLLBACKS, reason="application_error") == other
        with pytest.raises(KeyError):
            await breaks(session)
    assert metric(ROLLBACKS, reason="application_error") == other + 1


async def test_a_rollback_that_fails_itself_never_masks_the_error(
    pg_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = unique("rollback-fails")

    @transactional
    async def half_done(session: AsyncSession) -> None:
        await add_tenant(session, name)
        raise LookupError("the application's own error")

    async with pg_database.session() as session:
        real_rollback = session.rollback

        async def failing_rollback() -> None:
            await real_rollback()
            raise sa_exc.InterfaceError("ROLLBACK", {}, ConnectionError("gone\nsecond line"))

        monkeypatch.setattr(session, "rollback", failing_rollback)
        with capture_logs() as logs, pytest.raises(LookupError, match="own error"):
            await half_done(session)
    warnings = [e for e in logs if e["event"] == "rollback failed"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["function"].endswith("half_done")
    assert warnings[0]["error"] == "ConnectionError: gone"
    assert await tenants_named(pg_database, name) == 0


async def test_a_cancelled_call_rolls_back_logs_and_stays_cancelled(
    pg_database: Database,
) -> None:
    name = unique("cancelled")
    started = asyncio.Event()

    @transactional
    async def slow(session: AsyncSession) -> None:
        await add_tenant(session, name)
        started.set()
        await asyncio.Event().wait()  # until cancelled

    before = metric(ROLLBACKS, reason="application_error")
    async with pg_database.session() as session:
        with capture_logs() as logs:
            task = asyncio.create_task(slow(session))
            await asyncio.wait_for(started.wait(), 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert session.info["aura.transaction_depth"] == 0
        await add_tenant(session, unique("after-cancel"))  # the session is usable again
    assert [e["event"] for e in logs] == ["transaction cancelled; rolled back"]
    assert logs[0]["log_level"] == "warning"
    assert metric(ROLLBACKS, reason="application_error") == before + 1
    assert await tenants_named(pg_database, name) == 0


def dbapi_error(*, invalidated: bool, orig: BaseException | None = None) -> sa_exc.DBAPIError:
    return sa_exc.DBAPIError(
        "SELECT 1", {}, orig or Exception("boom"), connection_invalidated=invalidated
    )


class ConnectionDoesNotExistError(Exception):
    pass


class AdminShutdownError(Exception):
    pass


class CannotConnectNowError(Exception):
    pass


def chained(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__cause__ = inner
    return outer


@pytest.mark.parametrize(
    ("exc", "network"),
    [
        (sa_exc.OperationalError("SELECT 1", {}, Exception("x")), True),
        (sa_exc.DisconnectionError("dropped"), True),
        (dbapi_error(invalidated=True), True),
        (dbapi_error(invalidated=False), False),
        (sa_exc.InterfaceError("SELECT 1", {}, Exception("x"), connection_invalidated=True), True),
        (ConnectionRefusedError(111, "refused"), True),
        (TimeoutError(), True),
        (ConnectionDoesNotExistError(), True),
        (AdminShutdownError(), True),
        (CannotConnectNowError(), True),
        (ValueError("bad"), False),
        (InvalidInputError("bad"), False),
        (chained(RuntimeError("wrapper"), ConnectionResetError()), True),
        (chained(dbapi_error(invalidated=False), AdminShutdownError()), True),
        (chained(RuntimeError("wrapper"), KeyError("k")), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_what_counts_as_a_network_failure(exc: BaseException, network: bool) -> None:
    assert is_network_error(exc) is network


def test_describe_error_is_the_drivers_first_line_cut_to_300() -> None:
    wrapped = dbapi_error(invalidated=True, orig=ConnectionResetError("reset by peer\nDETAIL"))
    assert describe_error(wrapped) == "ConnectionResetError: reset by peer"
    assert describe_error(ValueError("")) == "ValueError: "
    assert describe_error(ValueError("  padded  \nsecond")) == "ValueError: padded  "
    long = describe_error(ValueError("x" * 1000))
    assert long == ("ValueError: " + "x" * 1000)[:300]
    assert len(long) == 300


async def _network_failure(
    database: Database, monkeypatch: pytest.MonkeyPatch, *, at_commit: bool
) -> tuple[DatabaseTransactionError, list[dict[str, Any]]]:
    lost = sa_exc.InterfaceError(
        "COMMIT", {}, ConnectionResetError("connection is closed"), connection_invalidated=True
    )

    @transactional
    async def work(session: AsyncSession) -> None:
        await add_tenant(session, unique("network"))
        if not at_commit:
            raise lost

    async with database.session() as session:
        if at_commit:

            async def failing_commit() -> None:
                raise lost

            monkeypatch.setattr(session, "commit", failing_commit)
        with capture_logs() as logs, pytest.raises(DatabaseTransactionError) as caught:
            await work(session)
    assert caught.value.__cause__ is lost
    return caught.value, logs


async def test_a_network_failure_before_commit(
    pg_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = metric(ROLLBACKS, reason="network_error")
    error, logs = await _network_failure(pg_database, monkeypatch, at_commit=False)
    assert error.commit_outcome_unknown is False
    assert str(error).endswith("(ConnectionResetError: connection is closed); rolled back")
    assert "work" in str(error)
    critical = [e for e in logs if e["log_level"] == "critical"]
    assert len(critical) == 1
    assert critical[0]["event"] == "database transaction rollback after a network failure"
    assert critical[0]["during_commit"] is False
    assert critical[0]["error"] == "ConnectionResetError: connection is closed"
    assert metric(ROLLBACKS, reason="network_error") == before + 1


async def test_a_network_failure_at_commit_says_the_outcome_is_unknown(
    pg_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    error, logs = await _network_failure(pg_database, monkeypatch, at_commit=True)
    assert error.commit_outcome_unknown is True
    assert str(error).endswith("rolled back; the COMMIT outcome is unknown")
    critical = [e for e in logs if e["log_level"] == "critical"]
    assert [e["during_commit"] for e in critical] == [True]
