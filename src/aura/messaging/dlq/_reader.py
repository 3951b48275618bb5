"""The reader: ``DeadLetterQueue`` files what has landed in the broker queue into the
store (committed, then acked) and answers every read with a query of the store, so
reading changes no letter, header or order, however often it runs."""

from __future__ import annotations

import builtins
import tempfile
import threading
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any, TypeVar

from kombu.connection import Connection
from sqlalchemy import case, delete, func, select

from aura.db import Database
from aura.errors import ServiceUnavailableError
from aura.logs import describe_exception
from aura.messaging._bounded import run_in_own_loop
from aura.messaging._compression import bound_compression
from aura.messaging._dlq_store import DEAD, LISTED, Filter, dead_letters, ensure_tables, replays
from aura.messaging.dlq._filing import file_landed, letter_of
from aura.messaging.dlq._letter import DeadLetter
from aura.messaging.dlq._replay import Replay, ReplayReport, replay_one
from aura.messaging.dlq._tasks import ReplayCheck, task_checks

T = TypeVar("T")
_memory_stores: dict[str, str] = {}
_memory_lock = threading.Lock()
_ensured: set[str] = set()


def store_url(connection: Connection | None = None) -> str:
    """The DLQ store's database: ``DLQ_DATABASE_URL``, else ``DATABASE_URL`` (else the
    embedded SQLite file); for kombu's in-memory broker, a SQLite file of this process."""
    from aura.config import get_settings
    from aura.db import database_url

    settings = get_settings()
    if settings.dlq_database_url is not None:
        return settings.dlq_database_url
    if connection is not None and connection.transport_cls in ("memory",):
        with _memory_lock:
            if "memory" not in _memory_stores:
                directory = tempfile.mkdtemp(prefix="aura-dlq-")
                _memory_stores["memory"] = f"sqlite+aiosqlite:///{directory}/dlq.db"
            return _memory_stores["memory"]
    return database_url(settings)


def source_of(connection: Connection) -> str:
    """What a store calls this broker: its virtual host (one vhost, one DLQ), or the
    in-memory broker's name."""
    if connection.transport_cls == "memory":
        return f"memory://{connection.hostname or ''}"
    return str(connection.virtual_host or "/")


class DeadLetterQueue:
    """The DLQ: what has landed in the broker queue is filed into the store (committed,
    then acked) and every read is a query of the store, so reading changes no letter,
    header or order, however often it runs.

    ``database`` is the store's URL (or a ``Database``, whose URL is used); by default
    ``store_url(connection)``. ``source`` names this broker in the store (its vhost).
    ``app`` is the Celery app whose tasks the letters are for (default: the one
    ``aura.messaging.configure`` made the default): filing finds each letter's tenant in
    its arguments by the task's parameters, and replay applies its tasks' checks
    (``task_checks``)."""

    def __init__(
        self,
        connection: Connection,
        database: Database | str | None = None,
        *,
        source: str | None = None,
        batch: int = 500,
        app: Any = None,
    ) -> None:
        bound_compression()
        if app is None:  # not celery.current_app: making one would bind every shared task
            from aura.messaging.app import configured_app

            app = configured_app()
        self.app = app
        self.connection = connection
        if isinstance(database, Database):
            database = database.url
        self.url = database or store_url(connection)
        self.source = source or source_of(connection)
        self.batch = batch
        self.dropped: dict[str, int] = {}

    # -- filing ---------------------------------------------------------------------

    def _database(self) -> Database:
        return Database(self.url, pool_size=2, max_overflow=2)

    async def _ready(self, database: Database) -> None:
        if self.url not in _ensured:
            await ensure_tables(database)
            _ensured.add(self.url)
        # reachable before any get; autocommit: a probe holds no transaction open
        async with database.reader.connect() as connection:
            await connection.execute(select(1))

    async def _file(self, database: Database) -> int:
        """Move what has landed into the store; the number of rows written."""
        written, dropped = await file_landed(
            self.connection, database, source=self.source, batch_size=self.batch, app=self.app
        )
        for reason, count in dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + count
        return written

    def _session(
        self, work: Callable[[Database], Coroutine[Any, Any, T]], *, file_first: bool = True
    ) -> T:
        """Reach the store, file what has landed (unless ``work`` is the filing), run
        ``work`` on its own loop and let the store go."""

        async def run() -> T:
            database = self._database()
            try:
                try:
                    await self._ready(database)
                except Exception as exc:
                    from aura.config import mask_url

                    raise ServiceUnavailableError(
                        f"the DLQ store at {mask_url(self.url)} cannot be reached: "
                        f"{describe_exception(exc)}"
                    ) from exc
                if file_first:
                    await self._file(database)
                return await work(database)
            finally:
                await database.dispose()

        return run_in_own_loop(run)

    def file(self) -> int:
        """File what has landed; the number of new letters."""
        return self._session(self._file, file_first=False)

    # -- reads ------------------------------------------------------------------------

    def list(
        self,
        *,
        reason: str | None = None,
        task: str | None = None,
        queue: str | None = None,
        tenant: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 50,
        after: int | None = None,
        raw: bool = False,
    ) -> builtins.list[DeadLetter]:  # builtins: "list" is this method inside the class
        """Matching dead letters, oldest first, one per fate; ``after``: the ``seq`` of
        the last letter of the previous page. ``raw``: malformed originals carry their
        bytes (``letter.original.raw()``)."""
        where = Filter(reason, task, queue, tenant, since, until).clauses(self.source)
        if after is not None:
            where.append(dead_letters.c.seq > after)
        columns: builtins.list[Any] = list(LISTED)
        if raw:  # the bytes of malformed originals only: nothing else is read from them
            body = case((dead_letters.c.kind == "original", dead_letters.c.body), else_=None)
            columns.append(body.label("body"))

        async def read(database: Database) -> builtins.list[DeadLetter]:
            statement = select(*columns).where(*where).order_by(dead_letters.c.seq).limit(limit)
            async with database.reader.connect() as connection:
                rows = (await connection.execute(statement)).all()
            return [letter_of(row) for row in rows]

        return self._session(read)

    def count(
        self,
        *,
        reason: str | None = None,
        task: str | None = None,
        queue: str | None = None,
        tenant: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> int:
        """How many dead letters match."""
        where = Filter(reason, task, queue, tenant, since, until).clauses(self.source)

        async def read(database: Database) -> int:
            async with database.reader.connect() as connection:
                found = await connection.scalar(select(func.count()).where(*where))
            return int(found or 0)

        return self._session(read)

    def count_by_reason(self) -> dict[str, int]:
        """Dead letters by reason, one per fate."""
        where = Filter().clauses(self.source)
        c = dead_letters.c

        async def read(database: Database) -> dict[str, int]:
            async with database.reader.connect() as connection:
                rows = await connection.execute(
                    select(c.reason, func.count()).where(*where).group_by(c.reason)
                )
                return {str(reason): int(n) for reason, n in rows}

        return self._session(read)

    def show(self, letter_id: str) -> DeadLetter | None:
        """The dead letter with this id (as ``ls`` prints it), dead or replayed."""
        c = dead_letters.c

        async def read(database: Database) -> DeadLetter | None:
            async with database.reader.connect() as connection:
                row = (
                    await connection.execute(
                        select(*LISTED).where(c.source == self.source, c.letter_id == letter_id)
                    )
                ).first()
            return letter_of(row) if row is not None else None

        return self._session(read)

    def replays(self, letter_id: str | None = None) -> builtins.list[dict[str, Any]]:
        """The replay record: who replayed which letter, when, to which queue."""
        c = replays.c
        where = [c.source == self.source]
        if letter_id is not None:
            where.append(c.letter_id == letter_id)

        async def read(database: Database) -> builtins.list[dict[str, Any]]:
            async with database.reader.connect() as connection:
                rows = await connection.execute(select(replays).where(*where).order_by(c.id))
                return [dict(row._mapping) for row in rows]

        return self._session(read)

    # -- changes ----------------------------------------------------------------------

    def purge(self, *, reason: str) -> int:
        """Remove the dead letters with ``reason``; every other letter stays."""
        c = dead_letters.c

        async def remove(database: Database) -> int:
            async with database.engine.begin() as connection:
                result = await connection.execute(
                    delete(dead_letters).where(
                        c.source == self.source, c.status == DEAD, c.reason == reason
                    )
                )
            return int(result.rowcount or 0)

        return self._session(remove)

    def replay(
        self,
        *,
        letter_id: str | None = None,
        reason: str | None = None,
        task: str | None = None,
        queue: str | None = None,
        tenant: str | None = None,
        to_queue: str | None = None,
        operator: str = "",
        check: ReplayCheck | None = None,
        limit: int = 10_000,
    ) -> ReplayReport:
        """Send dead letters back to the queue each came from (``to_queue`` overrides),
        with a fresh retry budget and their replay count: the one ``letter_id`` names, or
        those the filters select (``reason``, ``task``, ``queue``, ``tenant``; at least
        one). A letter is claimed in the store (one operator wins), published with a
        confirm, and marked replayed in the same transaction: replaying twice, or from two
        places at once, enqueues it once. Refused (with the reason, the letter stays): a
        malformed original, a forged or oversized letter, an unknown origin, a queue that
        does not exist, or what ``check`` says (default: ``task_checks(app)``)."""
        selected = (reason, task, queue, tenant)
        if (letter_id is None) == all(value is None for value in selected):
            raise ValueError("replay needs a dead letter id or a reason, not both")
        c = dead_letters.c
        if letter_id is not None:
            where = [c.source == self.source, c.status == DEAD, c.letter_id == letter_id]
        else:
            where = Filter(reason, task, queue, tenant).clauses(self.source)
        checks = check if check is not None else task_checks(self.app)
        settings = Replay(self.connection, self.source, to_queue, operator, checks)
        report = ReplayReport()

        async def run(database: Database) -> ReplayReport:
            async with database.reader.connect() as connection:
                seqs = (
                    await connection.scalars(
                        select(c.seq).where(*where).order_by(c.seq).limit(limit)
                    )
                ).all()
            for seq in seqs:
                await replay_one(database, seq, settings, report)
            return report

        return self._session(run)


def replay(reader: DeadLetterQueue, **options: Any) -> ReplayReport:
    """``reader.replay(**options)``: see ``DeadLetterQueue.replay``."""
    return reader.replay(**options)


def purge(reader: DeadLetterQueue, *, reason: str) -> int:
    """Remove the dead letters with ``reason``; every other letter stays."""
    return reader.purge(reason=reason)
