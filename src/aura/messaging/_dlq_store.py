"""The dead-letter store: where letters are read, counted, replayed and retained.

The broker queue ``aura.dlq`` stays the landing point (a worker's confirmed publish, the
broker's own dead-lettering); it is never browsed. ``file_landed`` moves what has landed
into two tables, with the ordering that keeps every letter: the rows are committed, then
the broker messages are acked (a crash in between files a second copy, which the key
below absorbs). Every read is a SQL query on indexed columns: it changes nothing, however
often it runs, and answers in milliseconds at a million letters.

    aura_dead_letters          one row per (source, message id, reason, fingerprint): the
                               fate key, so a second copy of one fate is one letter
                               whoever wrote it, with no Redis deciding; the letter's
                               bytes as they landed (for replay), its redacted record (for
                               views), where it came from and why
    aura_dead_letter_replays   who replayed which letter, when, to which queue

``source`` is the broker's virtual host: one store can hold several brokers' letters.
A letter is ``dead`` until replayed (``replayed``: kept for the record, not listed). A
replayed message that fails again lands with its replay count, and its row becomes
``dead`` again with that count and the newest position: never acked away.

Retention (``DLQ_RETENTION_LETTERS``, ``DLQ_RETENTION_DAYS``) removes the oldest rows
past the bound after each filing and counts them in ``aura_dlq_letters_dropped_total``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from aura.db import Database
from aura.db.tables import (
    DEAD,
    DEAD_LETTERS_TABLE,
    REPLAYED,
    REPLAYS_TABLE,
    add_dead_letter_tables,
    dead_letters,
    replays,
)
from aura.db.tables import (
    DEAD_LETTER_METADATA as metadata,
)

__all__ = [
    "DEAD",
    "DEAD_LETTERS_TABLE",
    "REPLAYED",
    "REPLAYS_TABLE",
    "Filter",
    "LandedLetter",
    "add_dead_letter_tables",
    "dead_letters",
    "enforce_retention",
    "ensure_tables",
    "file_letters",
    "mark_replayed",
    "replays",
]


@dataclass(frozen=True)
class LandedLetter:
    """One letter as the filer makes it: its row's values."""

    letter_id: str
    fate_id: str
    message_id: str
    reason: str
    fingerprint: str
    replay_count: int
    kind: str
    task: str
    queue: str
    tenant_id: str | None
    retries: int
    error_type: str
    error: str
    refusal: str
    dead_lettered_at: datetime
    record: dict[str, Any]
    body: bytes
    properties: dict[str, Any]

    def values(self, source: str, now: datetime) -> dict[str, Any]:
        return {
            "letter_id": self.letter_id,
            "source": source,
            "fate_id": self.fate_id,
            "message_id": self.message_id,
            "reason": self.reason,
            "fingerprint": self.fingerprint,
            "status": DEAD,
            "replay_count": self.replay_count,
            "kind": self.kind,
            "task": self.task,
            "queue": self.queue,
            "tenant_id": self.tenant_id,
            "retries": self.retries,
            "error_type": self.error_type,
            "error": self.error,
            "refusal": self.refusal,
            "dead_lettered_at": self.dead_lettered_at,
            "filed_at": now,
            "record": self.record,
            "body": self.body,
            "body_size": len(self.body),
            "properties": self.properties,
        }


@dataclass(frozen=True)
class Filter:
    """What a read selects; every field optional, all combine."""

    reason: str | None = None
    task: str | None = None
    queue: str | None = None
    tenant: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    status: str = DEAD

    def clauses(self, source: str) -> list[Any]:
        c = dead_letters.c
        found: list[Any] = [c.source == source, c.status == self.status]
        for column, value in (
            (c.reason, self.reason),
            (c.task, self.task),
            (c.queue, self.queue),
            (c.tenant_id, self.tenant),
        ):
            if value is not None:
                found.append(column == value)
        if self.since is not None:
            found.append(c.dead_lettered_at >= self.since)
        if self.until is not None:
            found.append(c.dead_lettered_at < self.until)
        return found


# Columns a listing reads: never the body (a 300 MiB letter costs a listing nothing).
LISTED = (
    dead_letters.c.seq,
    dead_letters.c.letter_id,
    dead_letters.c.record,
    dead_letters.c.status,
    dead_letters.c.replay_count,
    dead_letters.c.refusal,
    dead_letters.c.body_size,
    dead_letters.c.kind,
)


def _insert(dialect: str) -> Any:
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(dead_letters)


async def ensure_tables(database: Database) -> None:
    """Create the two tables where they do not exist yet (idempotent)."""
    async with database.engine.begin() as connection:
        await connection.run_sync(lambda sync: metadata.create_all(sync, checkfirst=True))


async def file_letters(
    connection: AsyncConnection, dialect: str, source: str, letters: Sequence[LandedLetter]
) -> int:
    """Insert ``letters`` in one transaction (the caller's); a second copy of a fate is
    dropped, a replayed fate that failed again is revived. Returns the rows written."""
    now = datetime.now(UTC)
    written = 0
    for letter in letters:
        written += await _file_one(connection, dialect, source, letter, now)
    return written


async def _file_one(
    connection: AsyncConnection, dialect: str, source: str, letter: LandedLetter, now: datetime
) -> int:
    c = dead_letters.c
    values = letter.values(source, now)
    statement = _insert(dialect).values(**values).on_conflict_do_nothing()
    result = await connection.execute(statement.returning(c.seq))
    if result.first() is not None:
        return 1
    key = and_(
        c.source == source,
        c.fate_id == letter.fate_id,
        c.reason == letter.reason,
        c.fingerprint == letter.fingerprint,
    )
    existing = (
        await connection.execute(select(c.seq, c.status, c.replay_count).where(key))
    ).first()
    if existing is None:  # the letter id was taken (by another fate): a new id for this one
        values["letter_id"] = uuid.uuid4().hex
        await connection.execute(_insert(dialect).values(**values))
        return 1
    newer = letter.replay_count > existing.replay_count
    if existing.status == REPLAYED or newer:
        # Replayed, and it failed again (a replay's retry may have lost its count: any
        # landing after a replay is that replay's fate), or a later replay's letter: dead
        # again, newest, with its replay count; the row's id is kept, so what an operator
        # noted still finds it.
        kept_id = (await connection.execute(select(c.letter_id).where(key))).scalar_one()
        await connection.execute(delete(dead_letters).where(key))
        values["letter_id"] = kept_id
        values["replay_count"] = max(letter.replay_count, existing.replay_count)
        await connection.execute(_insert(dialect).values(**values))
        return 1
    return 0  # a second copy of a letter already filed


async def enforce_retention(
    connection: AsyncConnection, source: str, *, max_letters: int, max_age_days: float
) -> dict[str, int]:
    """Remove the oldest letters past the bounds; the removed count by reason."""
    c = dead_letters.c
    doomed: list[Any] = []
    if max_age_days > 0:
        cutoff = datetime.now(UTC) - timedelta(days=max_age_days)
        doomed.append(and_(c.source == source, c.dead_lettered_at < cutoff))
    if max_letters > 0:
        boundary = (
            await connection.execute(
                select(c.seq)
                .where(c.source == source)
                .order_by(c.seq.desc())
                .offset(max_letters)
                .limit(1)
            )
        ).scalar()
        if boundary is not None:
            doomed.append(and_(c.source == source, c.seq <= boundary))
    dropped: dict[str, int] = {}
    for clause in doomed:
        rows = await connection.execute(
            select(c.reason, func.count()).where(clause).group_by(c.reason)
        )
        for reason, count in rows:
            dropped[reason] = dropped.get(reason, 0) + int(count)
        await connection.execute(delete(dead_letters).where(clause))
    return dropped


async def mark_replayed(
    connection: AsyncConnection,
    seq: int,
    *,
    replay_count: int,
    operator: str,
    to_queue: str,
    letter_id: str,
    message_id: str,
    source: str,
) -> None:
    await connection.execute(
        update(dead_letters)
        .where(dead_letters.c.seq == seq)
        .values(status=REPLAYED, replay_count=replay_count)
    )
    await connection.execute(
        replays.insert().values(
            letter_id=letter_id,
            message_id=message_id,
            source=source,
            replay_count=replay_count,
            operator=operator[:255],
            to_queue=to_queue,
            replayed_at=datetime.now(UTC),
        )
    )
