"""The platform's tables. Every row carries ``tenant_id``; every query filters on it.

tenants             a catalog owner; API keys are stored hashed
products            a tenant's product
variants            a product's variants; a SKU is unique within its tenant
enrichments         the current LLM enrichment of a product (at most one)
processed_messages  the inbox: one row per message whose effect is committed
imports, import_records  a bulk import and each record's fate (pending, done, dead_lettered)
outbox              messages committed with the change that caused them, not yet published
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Index,
    MetaData,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from aura.db.dead_letters import add_dead_letter_tables
from aura.message_id import MESSAGE_ID_MAX_LENGTH

__all__ = [
    "Base",
    "Enrichment",
    "Import",
    "ImportRecord",
    "ProcessedMessage",
    "Product",
    "Tenant",
    "Variant",
]


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    api_key_hash: Mapped[str | None] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Product(Base):
    __tablename__ = "products"
    __table_args__ = (Index("ix_products_tenant_created", "tenant_id", "created_at", "id"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    title: Mapped[str] = mapped_column(String(500))
    description: Mapped[str | None] = mapped_column(Text)
    brand: Mapped[str | None] = mapped_column(String(200))
    category: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)

    variants: Mapped[list[Variant]] = relationship(
        back_populates="product", order_by="Variant.sku", lazy="raise"
    )


class Variant(Base):
    __tablename__ = "variants"
    __table_args__ = (UniqueConstraint("tenant_id", "sku"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    product_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("products.id", ondelete="CASCADE"), index=True
    )
    sku: Mapped[str] = mapped_column(String(100))
    price: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    currency: Mapped[str] = mapped_column(String(3))
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    product: Mapped[Product] = relationship(back_populates="variants", lazy="raise")


class Enrichment(Base):
    __tablename__ = "enrichments"

    product_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("products.id", ondelete="CASCADE"), primary_key=True
    )
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    description: Mapped[str] = mapped_column(Text)
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    model: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ProcessedMessage(Base):
    __tablename__ = "processed_messages"
    __table_args__ = (Index("ix_processed_messages_tenant_task", "tenant_id", "task"),)

    message_id: Mapped[str] = mapped_column(String(MESSAGE_ID_MAX_LENGTH), primary_key=True)
    task: Mapped[str] = mapped_column(String(200))
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    processed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    # SHA-256 of the payload (aura.messaging.idempotency); NULL for rows made before 0004
    fingerprint: Mapped[str | None] = mapped_column(String(64))


class Import(Base):
    __tablename__ = "imports"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    accepted: Mapped[int] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ImportRecord(Base):
    __tablename__ = "import_records"
    __table_args__ = (Index("ix_import_records_import_status", "import_id", "status"),)

    message_id: Mapped[str] = mapped_column(String(MESSAGE_ID_MAX_LENGTH), primary_key=True)
    import_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("imports.id", ondelete="CASCADE"))
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column()
    status: Mapped[str] = mapped_column(String(20), default="pending")  # done, dead_lettered
    product_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class OutboxMessage(Base):
    """A message written in the same transaction as the change that needs it, deleted once
    the broker confirmed it; the relay publishes what a failed publish left behind.
    ``claimed_by`` publishes it, alone, until ``claimed_until`` (``aura.db.outbox``)."""

    __tablename__ = "outbox"

    message_id: Mapped[str] = mapped_column(String(MESSAGE_ID_MAX_LENGTH), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    task: Mapped[str] = mapped_column(String(200))
    queue: Mapped[str] = mapped_column(String(200))
    args: Mapped[list[Any]] = mapped_column(JSON)
    kwargs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, index=True)
    claimed_by: Mapped[str | None] = mapped_column(String(32))
    claimed_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


# The DLQ store's tables (aura.db.dead_letters), so that Alembic's view of the models is
# the migrations' (0006).
add_dead_letter_tables(Base.metadata)
