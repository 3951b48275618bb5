"""Aura's tables in your own SQLAlchemy metadata (and so in your Alembic history).

    from sqlalchemy.orm import DeclarativeBase
    from aura.db.tables import add_dead_letter_tables, add_inbox_table

    class Base(DeclarativeBase): ...
    add_inbox_table(Base.metadata)         # processed_messages, as Aura's migrations make it
    add_dead_letter_tables(Base.metadata)  # the DLQ store: aura_dead_letters, its replays

``Base.metadata.create_all`` then creates them with your tables, and Alembic's
``--autogenerate`` (``target_metadata = Base.metadata`` in your ``env.py``) writes its
migration into your history; do not also run ``aura db upgrade`` on that database (it
would make Aura's platform tables and its own ``alembic_version``). ``claim_message`` and
``DatabaseInbox`` find the table by name, ``processed_messages``.

The outbox (``aura.db.OutboxMessage``) is the gateway's: each row names a tenant of the
platform's ``tenants`` table, so it is not offered here.
"""

from __future__ import annotations

from sqlalchemy import MetaData, Table

from aura.db.models import ProcessedMessage


def add_dead_letter_tables(metadata: MetaData) -> tuple[Table, Table]:
    """The DLQ store's two tables (``aura_dead_letters``, ``aura_dead_letter_replays``) in
    ``metadata``. Optional: a DLQ reader creates them where they are missing."""
    from aura.db.dead_letters import add_dead_letter_tables as add

    return add(metadata)


__all__ = ["INBOX_TABLE", "add_dead_letter_tables", "add_inbox_table"]

INBOX_TABLE = "processed_messages"


def add_inbox_table(metadata: MetaData) -> Table:
    """A copy of the inbox table (columns, primary key, index) in ``metadata``; the one
    already there if it was added before."""
    existing = metadata.tables.get(INBOX_TABLE)
    if existing is not None:
        return existing
    source = ProcessedMessage.__table__
    assert isinstance(source, Table)
    return source.to_metadata(metadata)
