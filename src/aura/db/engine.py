"""Engine and sessions from Settings: PostgreSQL (asyncpg) or the embedded SQLite.

PostgreSQL gets the seed's pool (DB_POOL_SIZE, DB_MAX_OVERFLOW, DB_POOL_RECYCLE), a
connect timeout (DB_CONNECT_TIMEOUT; asyncpg's own default is 60 s) and a ping on checkout
of a connection that sat idle in the pool for ``ping_after_idle`` seconds (1 s), so a
connection the server dropped while idle is replaced on checkout, not discovered in the
middle of a transaction. Not every checkout: SQLAlchemy's ``pool_pre_ping`` costs three
round trips on asyncpg (BEGIN, ``;``, ROLLBACK: its pgbouncer support) per checkout, a
third of a worker's PostgreSQL round trips. A connection used within the last second is
taken as alive; if the server went away in that second, the first statement fails as a
network error (the task's retry), and SQLAlchemy invalidates the whole pool on it, so the
next checkouts connect afresh. The pool is LIFO, so the connections in use stay the few
hot ones and the rest age out (and are pinged) rather than each being idle in turn.
SQLite (aiosqlite) gets no pool arguments, foreign keys on, WAL and a busy timeout.

Checkouts and checkins are emitted as ``PoolConnectionsChanged`` events, which keep
``sqlalchemy_pool_connections_active`` equal to the connections checked out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from aura import events
from aura.config import Settings, get_settings
from aura.events import PoolConnectionsChanged

__all__ = ["EMBEDDED_DATABASE_PATH", "Database", "database_url"]

EMBEDDED_DATABASE_PATH = Path(".aura") / "aura.db"
_SQLITE_BUSY_TIMEOUT_MS = 10_000


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


_LAST_CHECKIN = "aura.last_checkin"


def _ping_idle_connections(
    engine: AsyncEngine, idle_after: float, clock: Callable[[], float] = time.monotonic
) -> None:
    """Ping a connection on checkout when it was checked in ``idle_after`` seconds ago or
    more (a new one never: it was just made). A ping that finds it dropped invalidates the
    pool (as ``pool_pre_ping`` does); SQLAlchemy then connects afresh (up to twice)."""
    pool = engine.sync_engine.pool
    dialect = engine.sync_engine.dialect
    dbapi_error = dialect.loaded_dbapi.Error  # what pool_pre_ping catches too

    def checked_in(_: Any, record: Any) -> None:
        if record is not None:
            record.info[_LAST_CHECKIN] = clock()

    def checking_out(dbapi_connection: Any, record: Any, _: Any) -> None:
        last = record.info.pop(_LAST_CHECKIN, None)
        if last is None or clock() - last < idle_after:
            return
        try:
            dialect.do_ping(dbapi_connection)
        except dbapi_error as exc:
            if dialect.is_disconnect(exc, dbapi_connection, None):
                raise sa_exc.InvalidatePoolError() from exc
            raise

    event.listen(pool, "checkin", checked_in)
    event.listen(pool, "checkout", checking_out)


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
        ping_after_idle: float = 1.0,
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
                "pool_use_lifo": True,
                # asyncpg waits 60 s for a server that accepts but never answers
                "connect_args": {"timeout": connect_timeout},
            }
        elif self.dialect == "sqlite" and parsed.database not in (None, "", ":memory:"):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine: AsyncEngine = create_async_engine(url, **options)
        if self.dialect == "sqlite":
            _configure_sqlite(self.engine)
        elif self.dialect == "postgresql":
            _ping_idle_connections(self.engine, ping_after_idle)  # first: before the count
        _track_pool(self.engine)
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
