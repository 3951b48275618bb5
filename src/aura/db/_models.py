"""The patterns' own tables, mapped for their queries (``aura.db._inbox``, ``aura.db._outbox``).

processed_messages  the inbox: one row per message whose effect is committed
outbox              messages committed with the change that caused them, not yet published

They name no table of anyone's app: an app puts copies in its own metadata (and so its
Alembic history) with ``aura.db.tables`` and adds what links them to its tables there (the
platform's outbox rows name a tenant: ``aura.catalog.models``). The statements here find
the tables by name.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Index, MetaData, String, Uuid, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from aura.message_id import MESSAGE_ID_MAX_LENGTH

__all__ = [
    "HELD_BY",
    "NAMING_CONVENTION",
    "TRACEPARENT_MAX_LENGTH",
    "Base",
    "OutboxMessage",
    "ProcessedMessage",
]

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
"""How Aura's migrations name constraints and indexes (a copy keeps the names it was made with)."""


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ProcessedMessage(Base):
    __tablename__ = "processed_messages"
    __table_args__ = (Index("ix_processed_messages_tenant_task", "tenant_id", "task"),)

    message_id: Mapped[str] = mapped_column(String(MESSAGE_ID_MAX_LENGTH), primary_key=True)
    task: Mapped[str] = mapped_column(String(200))
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    processed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    # SHA-256 of the payload (aura.messaging._idempotency); NULL for rows made before 0004
    fingerprint: Mapped[str | None] = mapped_column(String(64))


TRACEPARENT_MAX_LENGTH = 64  # version 00 is 55 characters; later versions may add fields
HELD_BY = "aura:held-for-dispatch"  # the owner of rows held for fair dispatch


class OutboxMessage(Base):
    """A message written in the same transaction as the change that needs it, deleted once
    the broker confirmed it; the relay publishes what a failed publish left behind.
    ``claimed_by`` publishes it, alone, until ``claimed_until`` (``aura.db._outbox``)."""

    __tablename__ = "outbox"
    # Rows held for fair dispatch, by queue and tenant, oldest first: the dispatcher's
    # count and its claim of each tenant's oldest read this, not the table
    # (``aura.db._outbox.HELD``).
    __table_args__ = (
        Index(
            "ix_outbox_held",
            "queue",
            "tenant_id",
            "created_at",
            "message_id",
            postgresql_where=text(f"claimed_by = '{HELD_BY}'"),
            sqlite_where=text(f"claimed_by = '{HELD_BY}'"),
        ),
    )

    message_id: Mapped[str] = mapped_column(String(MESSAGE_ID_MAX_LENGTH), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    task: Mapped[str] = mapped_column(String(200))
    queue: Mapped[str] = mapped_column(String(200))
    args: Mapped[list[Any]] = mapped_column(JSON)
    kwargs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, index=True)
    claimed_by: Mapped[str | None] = mapped_column(String(32))
    claimed_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The W3C trace context of the request that staged it (``aura.tracing``): its publish
    # span is that request's child. NULL when tracing was off.
    traceparent: Mapped[str | None] = mapped_column(String(TRACEPARENT_MAX_LENGTH))
