"""The DLQ store's tables (``aura.messaging._dlq_store`` reads and writes them): defined
apart, with only SQLAlchemy, so the models' metadata (and so Alembic's) holds them too."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

__all__ = [
    "DEAD",
    "DEAD_LETTERS_TABLE",
    "REPLAYED",
    "REPLAYS_TABLE",
    "add_dead_letter_tables",
    "dead_letters",
    "metadata",
    "replays",
]

DEAD_LETTERS_TABLE = "aura_dead_letters"
REPLAYS_TABLE = "aura_dead_letter_replays"
DEAD = "dead"
REPLAYED = "replayed"

metadata = MetaData()
_BigId = BigInteger().with_variant(Integer(), "sqlite")  # SQLite: INTEGER PRIMARY KEY

dead_letters = Table(
    DEAD_LETTERS_TABLE,
    metadata,
    Column("seq", _BigId, primary_key=True, autoincrement=True),
    Column("letter_id", String(64), nullable=False),
    Column("source", String(255), nullable=False),
    Column("fate_id", String(300), nullable=False),  # message id, or letter:<id> if none
    Column("message_id", String(255), nullable=False),
    Column("reason", String(40), nullable=False),
    Column("fingerprint", String(128), nullable=False),
    Column("status", String(16), nullable=False),
    Column("replay_count", Integer, nullable=False),
    Column("kind", String(16), nullable=False),  # aura | broker | original
    Column("task", String(255), nullable=False),
    Column("queue", String(255), nullable=False),
    Column("tenant_id", String(255), nullable=True),
    Column("retries", Integer, nullable=False),
    Column("error_type", String(100), nullable=False),
    Column("error", Text, nullable=False),
    Column("refusal", Text, nullable=False),  # why replay is refused; "" if it is not
    Column("dead_lettered_at", DateTime(timezone=True), nullable=False),
    Column("filed_at", DateTime(timezone=True), nullable=False),
    Column("record", JSON, nullable=False),  # the DeadLetter, redacted, original body out
    Column("body", LargeBinary, nullable=False),  # the bytes as they landed
    Column("body_size", BigInteger, nullable=False),
    Column("properties", JSON, nullable=False),  # content type, encoding, headers
    UniqueConstraint("source", "fate_id", "reason", "fingerprint", name="uq_aura_dlq_fate"),
    Index("uq_aura_dlq_letter_id", "letter_id", unique=True),
    Index("ix_aura_dlq_status", "source", "status", "seq"),
    Index("ix_aura_dlq_reason", "source", "status", "reason", "seq"),
    Index("ix_aura_dlq_task", "source", "status", "task", "seq"),
    Index("ix_aura_dlq_queue", "source", "status", "queue", "seq"),
    Index("ix_aura_dlq_tenant", "source", "status", "tenant_id", "seq"),
    Index("ix_aura_dlq_time", "source", "status", "dead_lettered_at"),
    Index("ix_aura_dlq_message", "source", "message_id"),
)

replays = Table(
    REPLAYS_TABLE,
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("letter_id", String(64), nullable=False, index=True),
    Column("message_id", String(255), nullable=False),
    Column("source", String(255), nullable=False),
    Column("replay_count", Integer, nullable=False),
    Column("operator", String(255), nullable=False),
    Column("to_queue", String(255), nullable=False),
    Column("replayed_at", DateTime(timezone=True), nullable=False),
)


def add_dead_letter_tables(target: MetaData) -> tuple[Table, Table]:
    """The two DLQ tables in your own metadata (and so your Alembic history)."""
    return (
        target.tables.get(DEAD_LETTERS_TABLE) or dead_letters.to_metadata(target),
        target.tables.get(REPLAYS_TABLE) or replays.to_metadata(target),
    )
