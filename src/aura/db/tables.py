"""Aura's tables in your own SQLAlchemy metadata (and so in your Alembic history).

    from sqlalchemy.orm import DeclarativeBase
    from aura.db.tables import add_dead_letter_tables, add_inbox_table, add_outbox_table

    class Base(DeclarativeBase): ...
    add_inbox_table(Base.metadata)         # processed_messages, as Aura's migrations make it
    add_outbox_table(Base.metadata)        # outbox (link its tenant_id to your tables there)
    add_dead_letter_tables(Base.metadata)  # the DLQ store: aura_dead_letters, its replays

``Base.metadata.create_all`` then creates them with your tables, and Alembic's
``--autogenerate`` (``target_metadata = Base.metadata`` in your ``env.py``) writes its
migration into your history; do not also run the platform's migrations (``aura db
upgrade``) on that database (they would make its catalog tables and its own
``alembic_version``). ``claim_message``, ``DatabaseInbox`` and ``aura.db._outbox`` find the
tables by name. The platform builds its own metadata the same way (``aura.catalog.models``).
"""

from __future__ import annotations

from sqlalchemy import MetaData, Table

from aura.db._dead_letters import (
    DEAD,
    DEAD_LETTERS_TABLE,
    REPLAYED,
    REPLAYS_TABLE,
    add_dead_letter_tables,
    dead_letters,
    replays,
)
from aura.db._dead_letters import metadata as DEAD_LETTER_METADATA
from aura.db._models import OutboxMessage, ProcessedMessage

__all__ = [
    "DEAD",
    "DEAD_LETTERS_TABLE",
    "DEAD_LETTER_METADATA",
    "INBOX_TABLE",
    "OUTBOX_TABLE",
    "REPLAYED",
    "REPLAYS_TABLE",
    "add_dead_letter_tables",
    "add_inbox_table",
    "add_outbox_table",
    "dead_letters",
    "replays",
]

INBOX_TABLE = "processed_messages"
OUTBOX_TABLE = "outbox"


def _copy(source: object, metadata: MetaData) -> Table:
    assert isinstance(source, Table)
    existing = metadata.tables.get(source.name)
    return existing if existing is not None else source.to_metadata(metadata)


def add_inbox_table(metadata: MetaData) -> Table:
    """A copy of the inbox table (columns, primary key, index) in ``metadata``; the one
    already there if it was added before."""
    return _copy(ProcessedMessage.__table__, metadata)


def add_outbox_table(metadata: MetaData) -> Table:
    """A copy of the outbox table in ``metadata`` (the one already there if it was added
    before). Its ``tenant_id`` names no table: add the foreign key your app wants to it."""
    return _copy(OutboxMessage.__table__, metadata)
