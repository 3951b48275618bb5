"""One statement, atomic on its own: the gateway's hot-path writes.

PostgreSQL runs a single statement (data-modifying CTEs included) as its own transaction:
all of it or none of it. ``execute_atomically`` sends one such statement on the pool's
asyncpg connection in autocommit -- one round trip, where a session's transaction takes a
BEGIN, a statement per table and a COMMIT -- and keeps what ``@transactional`` promises:

    outcome                          counted as (database_transaction_rollbacks_total)
    a constraint refused it          invalid_input; the asyncpg error is raised for the
                                     caller to name the field
    the connection went away         network_error; logged CRITICAL; the connection is
                                     discarded; DatabaseTransactionError with
                                     commit_outcome_unknown (the statement commits as it
                                     ends, so no one knows)
    anything else (cancelled too)    application_error; raised as it came

Measured before choosing (bench/RESULTS.md, "The gateway"): a session's BEGIN, one
statement and COMMIT cost 0.70 ms of CPU; the same on the pool's asyncpg connection 0.26.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from aura import events, tracing
from aura.db._engine import CHECKOUT_BOUND, Database
from aura.db._transactional import describe_error, is_network_error, while_out
from aura.errors import DatabaseTransactionError
from aura.events import RollbackReason, TransactionRolledBack

__all__ = ["execute_atomically", "fetch_row"]

_log = structlog.get_logger("aura.db")


async def execute_atomically(
    database: Database, function: str, statement: str, *arguments: Any
) -> asyncpg.Record | None:
    """Run ``statement`` (PostgreSQL only) as its own transaction and return the first
    row it answers with, if any; see the module doc."""
    async with _driver(database) as (connection, driver):
        try:
            if tracing.enabled():
                with tracing.db_span(function, statement, database.engine.url.database):
                    return await driver.fetchrow(statement, *arguments)
            return await driver.fetchrow(statement, *arguments)
        except BaseException as exc:
            if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
                _rolled_back(function, RollbackReason.INVALID_INPUT)
                raise
            if isinstance(exc, Exception) and (is_network_error(exc) or _connection_broken(exc)):
                await connection.invalidate()
                _rolled_back(function, RollbackReason.NETWORK_ERROR)
                _log.critical(
                    "database transaction rollback after a network failure",  # as the seed
                    function=function,
                    error=describe_error(exc),
                    during_commit=True,
                )
                raise DatabaseTransactionError(
                    f"{function}: database connection failed ({describe_error(exc)}); "
                    "the COMMIT outcome is unknown",
                    commit_outcome_unknown=True,
                ) from exc
            if not isinstance(exc, asyncpg.PostgresError):  # cancelled mid-statement
                await connection.invalidate()
            _rolled_back(function, RollbackReason.APPLICATION_ERROR)
            raise


async def fetch_row(database: Database, statement: str, *arguments: Any) -> asyncpg.Record | None:
    """One read (PostgreSQL only) on the pool's asyncpg connection, in autocommit: its
    first row, or None. A connection left unusable (cut, or cancelled mid-read) is
    discarded; the driver's error is raised as it came (a transient one: asyncpg's)."""
    async with _driver(database, patience=0.0) as (connection, driver):  # reads fail fast:
        try:  # the inbox's read before a delivery is the outage gate's probe
            if tracing.enabled():
                with tracing.db_span("fetch_row", statement, database.engine.url.database):
                    return await driver.fetchrow(statement, *arguments)
            return await driver.fetchrow(statement, *arguments)
        except BaseException as exc:
            if not isinstance(exc, asyncpg.PostgresError):
                await connection.invalidate()
            raise


CONNECT_PATIENCE = 3.0  # seconds a write waits for a connection through a blip, in all


@contextlib.asynccontextmanager
async def _driver(
    database: Database,
    *,
    patience: float = CONNECT_PATIENCE,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AsyncIterator[tuple[AsyncConnection, Any]]:
    """A pooled connection and its asyncpg connection under it (no transaction begun).

    For a write, a connection that cannot be had because the database is out (refused, "too
    many clients", a connect timeout) is tried again for ``patience`` seconds in all (0.1 s doubling
    to 1 s) before the error is raised: nothing was sent, so nothing is rolled back, and
    a task whose LLM call is done need not make it again for a blip (``aura chaos net-cut``
    counted such calls as extra). Past it the outage is raised as it came, for the
    worker's outage gate."""

    async def checkout() -> AsyncConnection:
        # Bounded: SQLAlchemy's pool wakes a waiter only when a connection comes back, so
        # while every connect fails (too many clients) a checkout waited the whole pool
        # timeout (30 s) and its task met its time limit there (aura chaos db-exhausted:
        # retries spent, a process recycled). Past it: an outage.
        async with asyncio.timeout(CHECKOUT_BOUND):
            return await database.engine.connect()

    def tell(exc: BaseException, pause: float) -> None:
        _log.warning(
            "no database connection for a statement; trying again",
            pause=pause,
            error=describe_error(exc),
        )

    # In all, not per attempt: an attempt that waits its whole CHECKOUT_BOUND counts too
    # (summing only the pauses, a write waited past the chaos suite's 10 s soft limit).
    async with asyncio.timeout(max(patience, CHECKOUT_BOUND)):
        connection = await while_out(
            checkout, patience=patience, first_pause=0.1, on_retry=tell, sleep=sleep
        )
    try:
        raw = await connection.get_raw_connection()
        yield connection, raw.driver_connection
    finally:
        await asyncio.shield(connection.close())  # as ``async with`` closes it


def _connection_broken(exc: Exception) -> bool:
    """asyncpg's own words for a connection that can no longer be used: closed under it
    (InterfaceError), or left mid-operation by a backend killed in the middle of the last
    one ("cannot switch to state 11; another operation is in progress")."""
    return isinstance(exc, asyncpg.InterfaceError | asyncpg.exceptions.InternalClientError)


def _rolled_back(function: str, reason: RollbackReason) -> None:
    events.emit(TransactionRolledBack(function, reason))
