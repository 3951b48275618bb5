"""Alembic environment: runs on the connection ``aura.db._migrate`` hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from aura.catalog.models import Base

_MIGRATION_LOCK = 0x41555241  # "AURA": one migrator at a time on PostgreSQL

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
    context.run_migrations()
