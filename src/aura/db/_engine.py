"""Engine and sessions from Settings: PostgreSQL (asyncpg) or the embedded SQLite.

PostgreSQL gets the seed's pool (DB_POOL_SIZE, DB_MAX_OVERFLOW, DB_POOL_RECYCLE), a
connect timeout (DB_CONNECT_TIMEOUT; asyncpg's own default is 60 s) and a check at
checkout in place of SQLAlchemy's pre-ping (no round trip: asyncpg's own "closed" flag),
so a connection the server dropped while idle -- a crashed primary's, after a failover --
is replaced on checkout, not discovered in the middle of a transaction. SQLite
(aiosqlite) gets no pool arguments, foreign keys on, WAL and a busy timeout.

Checkouts and checkins are emitted as ``PoolConnectionsChanged`` events, which keep
``sqlalchemy_pool_connections_active`` equal to the connections checked out.

A multi-host URL (``?host=a:5432&host=b:5432&target_session_attrs=read-write``: a primary
and its replicas) is connected host by host, each given an equal share of
``CHECKOUT_BOUND`` (or of the connect timeout, if less), and the host that took the last
session is tried first. asyncpg's own multi-host connect bounds all hosts together (read
in asyncpg 0.32's ``connect``: one ``timeout`` around the loop over the hosts), so a
first host that does not answer -- a dead machine drops packets, it does not refuse --
spent the whole timeout and the next host was never tried (libpq's ``connect_timeout`` is
per host). Refused, "starting up" and "not read-write" go on to the next host at once,
as in asyncpg.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from aura import events, tracing
from aura.config import Settings, get_settings
from aura.events import PoolConnectionsChanged

__all__ = ["CHECKOUT_BOUND", "EMBEDDED_DATABASE_PATH", "Database", "database_url", "reach"]

EMBEDDED_DATABASE_PATH = Path(".aura") / "aura.db"
CHECKOUT_BOUND = 3.0  # seconds one checkout may take (a connect, or a wait for the pool)
_SQLITE_BUSY_TIMEOUT_MS = 10_000
# Per host list, the index of the host that took the last session: tried first next time,
# so only the first connect after a failover pays for the dead host.
_last_good: dict[tuple[tuple[str, int], ...], int] = {}


def database_url(settings: Settings) -> str:
    """``DATABASE_URL``, or the embedded SQLite file when it is unset."""
    if settings.database_url is not None:
        return settings.database_url
    return f"sqlite+aiosqlite:///{EMBEDDED_DATABASE_PATH}"


def _track_pool(engine: AsyncEngine) -> None:
    pool = engine.sync_engine.pool

    def checked_out(*_: Any) -> None:
        events.emit(PoolConnectionsChanged(+1))

    def checked_in(*_: Any) -> None:
        events.emit(PoolConnectionsChanged(-1))

    event.listen(pool, "checkout", checked_out)
    event.listen(pool, "checkin", checked_in)


def _skip_closed(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """A pooled asyncpg connection whose socket the server closed is replaced at checkout
    (the pool takes DisconnectionError as "discard it and connect anew")."""
    driver = getattr(dbapi_connection, "_connection", None)
    if driver is not None and driver.is_closed():
        raise sa_exc.DisconnectionError("the server closed this pooled connection")


async def _connect_host_by_host(
    *args: Any,
    host: list[str],
    port: list[int],
    timeout: float = 60.0,  # noqa: ASYNC109 - asyncpg.connect's own argument, passed on
    **kwargs: Any,
) -> Any:
    """asyncpg's multi-host connect, one host at a time with its share of the bound (see
    the module doc); raises as asyncpg does: a refusal, else "no host matched"."""
    hosts = tuple(zip(host, port, strict=True))
    share = min(timeout, CHECKOUT_BOUND) / len(hosts)
    first = _last_good.get(hosts, 0)
    refused: BaseException | None = None
    mismatched: BaseException | None = None
    for index in [*range(first, len(hosts)), *range(first)]:
        address, number = hosts[index]
        try:
            connection = await asyncpg.connect(
                *args, host=address, port=number, timeout=share, **kwargs
            )
        except (OSError, asyncpg.CannotConnectNowError) as exc:  # TimeoutError is an OSError
            refused = exc
            continue
        except asyncpg.TargetServerAttributeNotMatched as exc:
            mismatched = exc
            continue
        _last_good[hosts] = index
        return connection
    raise refused or mismatched or OSError("no host to connect to")


def _host_by_host(_dialect: Any, _record: Any, _args: Any, parameters: dict[str, Any]) -> None:
    """``do_connect``: a multi-host URL's connect goes through ``_connect_host_by_host``
    (``prefer-standby`` aside: it picks among hosts at random, asyncpg's way)."""
    hosts = parameters.get("host")
    several = isinstance(hosts, list) and len(hosts) > 1
    if several and parameters.get("target_session_attrs") != "prefer-standby":
        parameters["async_creator_fn"] = _connect_host_by_host


def _configure_sqlite(engine: AsyncEngine) -> None:
    def on_connect(dbapi_connection: Any, _: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    event.listen(engine.sync_engine, "connect", on_connect)


class Database:
    """One engine and its session factory. Create it inside the event loop that uses it."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 50,
        max_overflow: int = 100,
        pool_recycle: int = 1800,
        pool_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        echo: bool = False,
    ) -> None:
        parsed = make_url(url)
        self.url = url
        self.dialect = parsed.get_backend_name()
        options: dict[str, Any] = {"echo": echo}
        if self.dialect == "postgresql":
            options |= {
                "pool_size": pool_size,
                "max_overflow": max_overflow,
                "pool_recycle": pool_recycle,
                "pool_timeout": pool_timeout,
                # No pre-ping: SQLAlchemy's asyncpg ping is BEGIN, ";" and ROLLBACK, three
                # round trips per checkout (a third of a small request). A backend that was
                # killed or restarted closes its socket, asyncpg marks the connection
                # closed, and _skip_closed replaces it at checkout with no round trip; a
                # connection that dies silently fails its first statement, which
                # @transactional reports as a network error (retried through the inbox).
                # asyncpg waits 60 s for a server that accepts but never answers
                "connect_args": {"timeout": connect_timeout},
            }
        elif self.dialect == "sqlite" and parsed.database not in (None, "", ":memory:"):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine: AsyncEngine = create_async_engine(url, **options)
        if self.dialect == "sqlite":
            _configure_sqlite(self.engine)
        if self.dialect == "postgresql":  # before _track_pool: a discarded one is not counted
            event.listen(self.engine.sync_engine.pool, "checkout", _skip_closed)
            event.listen(self.engine.sync_engine, "do_connect", _host_by_host)
        _track_pool(self.engine)
        tracing.instrument_engine(self.engine)  # a span per statement, when tracing is on
        # The same pool in autocommit, for single reads: no BEGIN and ROLLBACK around them.
        self.reader: AsyncEngine = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self.sessions: async_sessionmaker[AsyncSession] = async_sessionmaker(
            self.engine, expire_on_commit=False
        )

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **overrides: Any) -> Database:
        settings = settings or get_settings()
        options: dict[str, Any] = {
            "pool_size": settings.db_pool_size,
            "max_overflow": settings.db_max_overflow,
            "pool_recycle": settings.db_pool_recycle,
            "connect_timeout": settings.db_connect_timeout,
        }
        return cls(database_url(settings), **(options | overrides))

    def session(self) -> AsyncSession:
        """A new session; use it as ``async with db.session() as session:``."""
        return self.sessions()

    def checked_out(self) -> int:
        """Connections of this engine's pool checked out right now."""
        status: int = self.engine.sync_engine.pool.checkedout()  # type: ignore[attr-defined]
        return status

    async def dispose(self) -> None:
        await self.engine.dispose()


async def reach(settings: Settings, within: float | None = None) -> None:
    """Connect once to ``DATABASE_URL`` and let go; raise if that fails or takes longer
    than ``within`` seconds (default ``DB_CONNECT_TIMEOUT`` + 1). A pre-flight check: the
    gateway's before it serves, a worker's at start."""
    database = Database.from_settings(settings, pool_size=1, max_overflow=0)
    bound = settings.db_connect_timeout + 1 if within is None else within
    try:
        async with asyncio.timeout(bound), database.engine.connect():
            pass
    finally:
        await database.dispose()
