"""The ``aura`` command line.

Settings are validated once, before any command runs: a bad value prints one line naming
the variable and exits 2. A service that cannot be used (PostgreSQL, RabbitMQ, Redis:
unreachable, refused credentials, no such database or vhost) is one line naming it and its
URL, password masked, exit 2 (``aura.cli.failures``); so is a command whose extra is not
installed (``aura.cli.extras``). Any other Aura error is one line too (exit 2 for bad input
or configuration, 1 otherwise); tracebacks are for bugs only.

Starting is cheap: the command modules import what a command needs inside it, so ``aura
--help`` (and shell completion, which runs the program) loads typer and little else
(``bench/cli_startup.py``). ``aura --version``, ``-h``, and ``aura
--install-completion`` / ``--show-completion`` (bash, zsh, fish, PowerShell; Typer's).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from aura.errors import AuraError, ConfigurationError, InvalidInputError

__all__ = ["app", "config_command", "main"]


def _readable_labels() -> None:
    """Typer 0.2x labels every option with its Python type (``--json <bool>``, ``--task
    <str>``). Show none for a flag (it takes no value) and the classic click names for the
    rest (TEXT, INTEGER, FLOAT). Only the help text changes; if Typer drops the method,
    this does nothing."""
    from typer.core import TyperArgument, TyperOption

    names = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "int range": "INTEGER"}
    names["float range"] = "FLOAT"
    for cls in (TyperOption, TyperArgument):
        original = getattr(cls, "display_type_rich", None)
        if original is None or getattr(original, "_aura", False):
            continue

        def display_type_rich(self: Any, ctx: Any, original: Any = original) -> str | None:
            if getattr(self, "is_flag", False) or getattr(self, "count", False):
                return None
            label = original(self, ctx)
            if not isinstance(label, str):
                return None
            if not label.startswith("<"):
                return label
            bare = label.strip("<>.")
            return names.get(bare, bare.upper()) + ("..." if label.endswith("...") else "")

        display_type_rich._aura = True  # type: ignore[attr-defined]
        setattr(cls, "display_type_rich", display_type_rich)  # noqa: B010


_readable_labels()

app = typer.Typer(
    name="aura",
    help="Aura: resilience for Celery, RabbitMQ, PostgreSQL, Redis and LLM APIs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from aura import __version__

        typer.echo(f"aura {__version__}")
        raise typer.Exit()


def _only_help(ctx: typer.Context) -> bool:
    """Whether this run only prints help or completions: then nothing is configured."""
    return ctx.resilient_parsing or any(arg in ("-h", "--help") for arg in sys.argv[1:])


@app.callback()
def _startup(
    ctx: typer.Context,
    version: bool = typer.Option(
        False,
        "--version",
        "-V",
        callback=_print_version,
        is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    if _only_help(ctx):
        return
    from aura.config import get_settings
    from aura.logs import configure_logging, register_secret

    settings = get_settings()  # raises ConfigurationError on a bad environment
    register_secret(settings.llm_api_key.get_secret_value())
    configure_logging(settings.log_level, settings.log_format)


@app.command("config")
def config_command(
    as_json: bool = typer.Option(False, "--json", help="Print the settings as JSON."),
) -> None:
    """Print the effective settings (secrets and URL passwords masked)."""
    from rich.console import Console
    from rich.table import Table

    from aura.config import get_settings

    settings = get_settings()
    shown = settings.as_display()
    if as_json:
        typer.echo(json.dumps(shown, indent=2))
        return
    sources = settings.sources()
    table = Table(title="Aura settings")
    table.add_column("variable")
    table.add_column("value")
    table.add_column("from")
    for variable, value in shown.items():
        table.add_row(variable, value, sources[variable])
    Console().print(table)


# Commands live in their own modules and register themselves on ``app``.
from aura.cli import chaos as _chaos  # noqa: E402, F401
from aura.cli import db as _db  # noqa: E402, F401
from aura.cli import demo as _demo  # noqa: E402, F401
from aura.cli import dlq as _dlq  # noqa: E402, F401
from aura.cli import llm as _llm  # noqa: E402, F401
from aura.cli import platform as _platform  # noqa: E402, F401
from aura.cli import state as _state  # noqa: E402, F401
from aura.cli import tenants as _tenants  # noqa: E402, F401


def main() -> None:
    """Entry point: run the CLI, turning Aura errors into one line and an exit code."""
    try:
        app(prog_name="aura")
    except (ConfigurationError, InvalidInputError) as exc:
        print(f"aura: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:
        from aura.cli.extras import missing_extra
        from aura.cli.failures import service_failure
        from aura.config import get_settings

        line = missing_extra(exc) or service_failure(exc, get_settings())
        if line is not None:
            print(f"aura: {line}", file=sys.stderr)
            sys.exit(2)
        if isinstance(exc, AuraError):
            print(f"aura: {type(exc).__name__}: {exc}", file=sys.stderr)
            sys.exit(1)
        raise
