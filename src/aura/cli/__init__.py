"""The ``aura`` command line.

Settings are validated once, before any command runs: a bad value prints one line naming
the variable and exits 2. A service that cannot be used (PostgreSQL, RabbitMQ, Redis:
unreachable, refused credentials, no such database or vhost) is one line naming it and its
URL, password masked, exit 2 (``aura.cli.failures``). Any other Aura error is one line too
(exit 2 for bad input or configuration, 1 otherwise); tracebacks are for bugs only.
"""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console
from rich.table import Table

from aura.cli.failures import service_failure
from aura.config import get_settings
from aura.errors import AuraError, ConfigurationError, InvalidInputError
from aura.logs import configure_logging, register_secret

__all__ = ["app", "main"]

app = typer.Typer(
    name="aura",
    help="Aura: resilience for Celery, RabbitMQ, PostgreSQL, Redis and LLM APIs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _startup() -> None:
    settings = get_settings()  # raises ConfigurationError on a bad environment
    register_secret(settings.llm_api_key.get_secret_value())
    configure_logging(settings.log_level, settings.log_format)


@app.command("config")
def config_command(
    as_json: bool = typer.Option(False, "--json", help="Print the settings as JSON."),
) -> None:
    """Print the effective settings (secrets and URL passwords masked)."""
    settings = get_settings()
    shown = settings.as_display()
    if as_json:
        typer.echo(json.dumps(shown, indent=2))
        return
    explicit = {name.upper() for name in settings.model_fields_set}
    table = Table(title="Aura settings")
    table.add_column("variable")
    table.add_column("value")
    table.add_column("from")
    for variable, value in shown.items():
        table.add_row(variable, value, "environment" if variable in explicit else "default")
    Console().print(table)


# Commands live in their own modules and register themselves on ``app``.
from aura.cli import chaos as _chaos  # noqa: E402, F401
from aura.cli import db as _db  # noqa: E402, F401
from aura.cli import demo as _demo  # noqa: E402, F401
from aura.cli import dlq as _dlq  # noqa: E402, F401
from aura.cli import llm as _llm  # noqa: E402, F401
from aura.cli import platform as _platform  # noqa: E402, F401
from aura.cli import state as _state  # noqa: E402, F401


def main() -> None:
    """Entry point: run the CLI, turning Aura errors into one line and an exit code."""
    try:
        app()
    except (ConfigurationError, InvalidInputError) as exc:
        print(f"aura: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:
        line = service_failure(exc, get_settings())
        if line is not None:
            print(f"aura: {line}", file=sys.stderr)
            sys.exit(2)
        if isinstance(exc, AuraError):
            print(f"aura: {type(exc).__name__}: {exc}", file=sys.stderr)
            sys.exit(1)
        raise
