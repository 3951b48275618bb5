"""Schema migrations (Alembic), run programmatically on a ``Database``.

``aura db upgrade`` calls ``upgrade``. The migration scripts ship inside the package, so an
installed Aura can migrate without a checkout.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection

from aura.config import mask_url
from aura.db.engine import Database
from aura.db.transactional import describe_error, is_network_error
from aura.errors import ServiceUnavailableError

__all__ = ["current_revision", "upgrade"]

_SCRIPTS = Path(__file__).with_name("migrations")


def _config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_SCRIPTS))
    config.attributes["connection"] = connection
    return config


async def upgrade(database: Database, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (all of them by default)."""
    try:
        async with database.engine.begin() as connection:
            await connection.run_sync(lambda sync: command.upgrade(_config(sync), revision))
    except Exception as exc:
        if is_network_error(exc):
            service = "PostgreSQL" if database.dialect == "postgresql" else "SQLite"
            raise ServiceUnavailableError(
                f"cannot reach {service} at {mask_url(database.url)}: {describe_error(exc)}"
            ) from exc
        raise


async def current_revision(database: Database) -> str | None:
    async with database.engine.connect() as connection:
        return await connection.run_sync(
            lambda sync: MigrationContext.configure(sync).get_current_revision()
        )
