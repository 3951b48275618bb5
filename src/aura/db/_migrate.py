"""Schema migrations (Alembic), run programmatically on a ``Database``.

``apply_migrations`` runs an Alembic script directory (an app's own, or the platform's:
``aura.catalog.migrate``, which ``aura db upgrade`` calls) on the database's connection;
its ``env.py`` finds that connection in ``config.attributes["connection"]``. A database
that cannot be reached is a ``ServiceUnavailableError`` naming it (password masked).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection

from aura.config import mask_url
from aura.db._engine import Database
from aura.db._transactional import describe_error, is_network_error
from aura.errors import ServiceUnavailableError

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = ["apply_migrations", "current_revision"]

# Alembic (and Mako, which it loads) is imported when a migration runs, not with aura.db:
# every worker and gateway process imported it at start-up, 0.12 s and its memory, and
# none of them migrates.


def _config(connection: Connection, scripts: Path) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(scripts))
    config.attributes["connection"] = connection
    return config


async def apply_migrations(database: Database, scripts: Path, revision: str = "head") -> None:
    """Apply the migrations in ``scripts`` up to ``revision`` (all of them by default)."""
    from alembic import command

    try:
        async with database.engine.begin() as connection:
            await connection.run_sync(
                lambda sync: command.upgrade(_config(sync, scripts), revision)
            )
    except Exception as exc:
        if is_network_error(exc):
            service = "PostgreSQL" if database.dialect == "postgresql" else "SQLite"
            raise ServiceUnavailableError(
                f"cannot reach {service} at {mask_url(database.url)}: {describe_error(exc)}"
            ) from exc
        raise


async def current_revision(database: Database) -> str | None:
    from alembic.runtime.migration import MigrationContext

    async with database.engine.connect() as connection:
        return await connection.run_sync(
            lambda sync: MigrationContext.configure(sync).get_current_revision()
        )
