"""``@transactional``: one function, one transaction, and a loud, clean failure.

Used as the seed shows::

    @transactional
    async def create_product_with_variants(session: AsyncSession, tenant_id, data): ...

The first argument is an ORM ``AsyncSession`` or a Core ``AsyncConnection`` (from
``engine.connect()``: a task whose effect is a few Core statements skips the ORM's
per-statement work). The outermost call commits when the function returns. Nested calls
on the same session join the outer transaction; if an inner call raises, the transaction
is marked rollback-only, so the outer call can never commit half of it even if it catches
the error (it gets ``TransactionAbortedError`` instead).

On a network failure it rolls back explicitly, logs CRITICAL, counts
``database_transaction_rollbacks_total{reason="network_error"}`` and raises
``DatabaseTransactionError`` from the original. What counts as a network failure was
measured, not assumed: with asyncpg, a backend killed by ``pg_terminate_backend`` surfaces
as ``sqlalchemy.exc.InterfaceError`` ("connection is closed"; at COMMIT "cannot call
Transaction.commit(): the underlying connection is closed") or, when the kill lands while
a statement is in flight, as ``sqlalchemy.exc.DBAPIError`` ("connection was closed in the
middle of operation") or ``sqlalchemy.exc.InternalError`` ("cannot switch to state 11;
another operation is in progress"), all with ``connection_invalidated=True`` -- never
``OperationalError``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Concatenate, ParamSpec, TypeVar

import structlog
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from aura import events
from aura.backoff import Backoff
from aura.errors import (
    DatabaseTransactionError,
    InvalidInputError,
    TransactionAbortedError,
    cause_chain,
)
from aura.events import RollbackReason, TransactionRolledBack

__all__ = [
    "describe_error",
    "is_network_error",
    "is_outage",
    "is_unavailable",
    "transactional",
    "while_out",
]

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S", AsyncSession, AsyncConnection)

_DEPTH = "aura.transaction_depth"
_ROLLBACK_ONLY = "aura.rollback_only"
_log = structlog.get_logger("aura.db")


# asyncpg's names for a connection lost or never made. TargetServerAttributeNotMatched:
# every host of a multi-host URL answered, none takes writes (``target_session_attrs=
# read-write`` while a failover is under way: the old primary back as a standby, the new
# one not yet promoted); the dead host's refusal is raised instead when there is one.
_CONNECTION_LOST = frozenset(
    {
        "ConnectionDoesNotExistError",
        "AdminShutdownError",
        "CannotConnectNowError",
        "TargetServerAttributeNotMatched",
    }
)


def is_network_error(exc: BaseException) -> bool:
    """True when ``exc`` means the connection to the database failed or was dropped."""
    for link in cause_chain(exc):
        if isinstance(link, sa_exc.OperationalError | sa_exc.DisconnectionError):
            return True
        if isinstance(link, sa_exc.DBAPIError) and link.connection_invalidated:
            return True
        if isinstance(link, OSError):  # refused, unresolvable, timed out (raw from asyncpg)
            return True
        # asyncpg's own classes, reached through DBAPIError.orig.__cause__
        if type(link).__name__ in _CONNECTION_LOST:
            return True
    return False


# SQLSTATE classes that mean "the server cannot take this now": connection exceptions,
# insufficient resources (53300 too many connections, disk full, out of memory) and
# operator intervention (shutting down, starting up, backend terminated).
_UNAVAILABLE_SQLSTATES = ("08", "53", "57P")


def is_unavailable(exc: BaseException) -> bool:
    """The database is down or saturated (retry later), not a bug: a network error, a
    pool or connect timeout, or a SQLSTATE of class 08, 53 or 57P ("too many clients")."""
    if is_network_error(exc):
        return True
    for link in cause_chain(exc):
        if isinstance(link, sa_exc.TimeoutError | OSError | TimeoutError):
            return True
        code = getattr(link, "sqlstate", None) or getattr(link, "pgcode", None)
        if isinstance(code, str) and code.startswith(_UNAVAILABLE_SQLSTATES):
            return True
    return False


_OUTAGE_CLASSES = _CONNECTION_LOST | {"TooManyConnectionsError", "ConnectionFailureError"}


def is_outage(exc: BaseException) -> bool:
    """The database cannot be reached or take a connection now -- refused, dropped,
    timed out, "too many clients", shutting down -- as opposed to a statement it refused
    (``is_unavailable`` also counts every ``OperationalError``, which for SQLite includes
    "no such table": a bug to report, not an outage to wait out)."""
    for link in cause_chain(exc):
        if isinstance(link, OSError | TimeoutError | sa_exc.TimeoutError):
            return True
        if isinstance(link, sa_exc.DisconnectionError):
            return True
        if isinstance(link, sa_exc.DBAPIError) and link.connection_invalidated:
            return True
        if type(link).__name__ in _OUTAGE_CLASSES:
            return True
        code = getattr(link, "sqlstate", None) or getattr(link, "pgcode", None)
        if isinstance(code, str) and code.startswith(_UNAVAILABLE_SQLSTATES):
            return True
    return False


async def while_out(
    attempt: Callable[[], Awaitable[R]],
    *,
    patience: float,
    first_pause: float,
    on_retry: Callable[[BaseException, float], None],
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> R:
    """``attempt()``, tried again while it fails with an outage (``is_outage``) for at most
    ``patience`` seconds, pausing ``first_pause`` doubling to 1 s (so it goes on within a
    second of the database answering); ``on_retry(error, pause)`` before each pause. Any
    other error, or an outage past the patience, is raised as it came."""
    pauses = Backoff(base=first_pause, cap=1.0, jitter=False)
    waited, tries = 0.0, 0
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if waited >= patience or not is_outage(exc):
                raise
            tries += 1
            pause = pauses.delay(tries)
            on_retry(exc, pause)
            await sleep(pause)
            waited += pause


def describe_error(exc: BaseException) -> str:
    """The driver's first line, without SQLAlchemy's statement and parameters."""
    original = getattr(exc, "orig", None) or exc
    text = str(original).strip().splitlines()
    return f"{type(original).__name__}: {text[0] if text else ''}"[:300]


async def _rollback(session: AsyncSession | AsyncConnection, function: str) -> None:
    try:
        await session.rollback()
    except Exception as exc:  # never mask the error that brought us here
        _log.warning("rollback failed", function=function, error=describe_error(exc))


def transactional(
    fn: Callable[Concatenate[S, P], Awaitable[R]],
) -> Callable[Concatenate[S, P], Awaitable[R]]:
    """Run ``fn(session, ...)`` in one transaction on ``session``; see the module doc."""
    function = fn.__qualname__

    @functools.wraps(fn)
    async def wrapper(session: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if session.info.get(_DEPTH, 0) > 0:
            return await _joined(fn, session, *args, **kwargs)
        session.info[_DEPTH] = 1
        session.info[_ROLLBACK_ONLY] = False
        committing = False
        try:
            result = await fn(session, *args, **kwargs)
            if session.info[_ROLLBACK_ONLY]:
                raise TransactionAbortedError(
                    f"{function}: an inner transactional call failed; nothing was committed"
                )
            committing = True
            await session.commit()
            return result
        except BaseException as exc:
            await _handle_failure(session, function, exc, during_commit=committing)
            raise
        finally:
            session.info[_DEPTH] = 0

    return wrapper


async def _joined(
    fn: Callable[Concatenate[S, P], Awaitable[R]],
    session: S,
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> R:
    """A nested call: run inside the outer transaction; a failure dooms all of it."""
    session.info[_DEPTH] += 1
    try:
        return await fn(session, *args, **kwargs)
    except BaseException:
        session.info[_ROLLBACK_ONLY] = True
        raise
    finally:
        session.info[_DEPTH] -= 1


async def _handle_failure(
    session: AsyncSession | AsyncConnection,
    function: str,
    exc: BaseException,
    *,
    during_commit: bool,
) -> None:
    """Roll back, count, log; turn a network failure into ``DatabaseTransactionError``."""
    await _rollback(session, function)
    if is_network_error(exc):
        events.emit(TransactionRolledBack(function, RollbackReason.NETWORK_ERROR))
        _log.critical(
            "database transaction rollback after a network failure",  # the seed greps "rollback"
            function=function,
            error=describe_error(exc),
            during_commit=during_commit,
        )
        raise DatabaseTransactionError(
            f"{function}: database connection failed ({describe_error(exc)}); rolled back"
            + ("; the COMMIT outcome is unknown" if during_commit else ""),
            commit_outcome_unknown=during_commit,
        ) from exc
    reason = (
        RollbackReason.INVALID_INPUT
        if isinstance(exc, InvalidInputError)
        else RollbackReason.APPLICATION_ERROR
    )
    events.emit(TransactionRolledBack(function, reason))
    if isinstance(exc, asyncio.CancelledError):
        _log.warning("transaction cancelled; rolled back", function=function)
