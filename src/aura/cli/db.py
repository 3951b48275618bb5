"""``aura db``: the database schema."""

from __future__ import annotations

import asyncio

import typer

from aura.cli import app

__all__ = ["upgrade_command"]

db_app = typer.Typer(help="The database schema (Alembic migrations).", no_args_is_help=True)
app.add_typer(db_app, name="db")


async def _upgrade() -> str | None:
    from aura.catalog import upgrade
    from aura.config import get_settings
    from aura.db import Database, current_revision

    database = Database.from_settings(get_settings())
    try:
        await upgrade(database)
        return await current_revision(database)
    finally:
        await database.dispose()


@db_app.command("upgrade")
def upgrade_command() -> None:
    """Apply every migration to DATABASE_URL (or the embedded SQLite file)."""
    from aura.config import get_settings, mask_url
    from aura.db import database_url

    revision = asyncio.run(_upgrade())
    typer.echo(f"database {mask_url(database_url(get_settings()))} is at revision {revision}")
