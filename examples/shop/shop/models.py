"""The shop's own tables, and Aura's inbox in the same metadata (one ``create_all``, one
Alembic history: ``target_metadata = Base.metadata`` in the shop's ``env.py``)."""

from __future__ import annotations

from sqlalchemy import String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from aura.db.tables import add_inbox_table


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "shop_orders"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    item: Mapped[str] = mapped_column(String(200))
    blurb: Mapped[str | None] = mapped_column(Text)
    times_described: Mapped[int] = mapped_column(default=0)


add_inbox_table(Base.metadata)  # processed_messages: what @resilient_task(inbox=) reads
