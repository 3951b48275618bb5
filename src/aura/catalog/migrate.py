"""The platform's schema: its migrations (``aura.catalog.migrations``) on a ``Database``.

``aura db upgrade`` calls ``upgrade``. The scripts ship inside the package, so an installed
Aura can migrate without a checkout. They make the catalog's tables and the patterns' own
(the inbox, the outbox, the DLQ store), as ``aura.catalog.models`` describes them.
"""

from __future__ import annotations

from pathlib import Path

from aura.db import Database, apply_migrations, current_revision

__all__ = ["MIGRATIONS", "current_revision", "upgrade"]

MIGRATIONS = Path(__file__).with_name("migrations")
"""The platform's Alembic script directory."""


async def upgrade(database: Database, revision: str = "head") -> None:
    """Apply the platform's migrations up to ``revision`` (all of them by default)."""
    await apply_migrations(database, MIGRATIONS, revision)
