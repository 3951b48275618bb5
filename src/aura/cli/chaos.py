"""``aura chaos``: run named fault scenarios on the real services (see ``aura.chaos``)."""

from __future__ import annotations

import json
import signal
import sys
from types import FrameType

import typer

from aura.cli import app
from aura.errors import InvalidInputError


def _interrupt_on_sigterm() -> None:
    """SIGTERM ends a run as Ctrl-C does: the run's own stack is removed on the way out."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


@app.command("chaos")
def chaos_command(
    name: str = typer.Argument("", help="A scenario (see --list), or all."),
    list_them: bool = typer.Option(False, "--list", help="List the scenarios and stop."),
    products: int = typer.Option(0, help="Records per scenario (0: the scenario's default)."),
    seed: int = typer.Option(-1, help="Seed for the run's faults (default: a random one)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per scenario."),
) -> None:
    """Each scenario: a bounded load with one real fault on the run's own database, vhost
    and Redis, then heal, drain and an accounting of every message. Exit code 1 when any
    scenario fails (a message lost, stranded, doubled, or its fate unexpected)."""
    from rich.console import Console
    from rich.table import Table

    from aura.chaos import SCENARIOS, run_scenario

    if list_them:
        for scenario in SCENARIOS.values():
            typer.echo(f"{scenario.name:<16} {scenario.summary}")
        return
    if not name:
        raise InvalidInputError("name a scenario (aura chaos --list) or all", field="name")
    if name != "all" and name not in SCENARIOS:
        raise InvalidInputError(
            f"unknown scenario {name!r}; expected all or one of {', '.join(SCENARIOS)}",
            field="name",
        )
    if products < 0:
        raise InvalidInputError(f"--products must be >= 0, got {products}", field="products")
    if seed < -1 or seed > 2**32:
        raise InvalidInputError(f"--seed must be between 0 and 2**32, got {seed}", field="seed")
    _interrupt_on_sigterm()
    names = list(SCENARIOS) if name == "all" else [name]
    console = Console(stderr=as_json)
    failed = 0
    for scenario_name in names:
        if not as_json:
            console.print(f"[bold]{scenario_name}[/bold]: {SCENARIOS[scenario_name].summary}")
        result = run_scenario(
            scenario_name, products=products or None, seed=None if seed < 0 else seed
        )
        failed += not result.passed
        if as_json:
            typer.echo(json.dumps(result.as_dict()))
            continue
        table = Table(show_header=False)
        table.add_column(style="bold")
        table.add_column(justify="right")
        rows = [
            ("passed", "[green]yes[/green]" if result.passed else "[red]NO[/red]"),
            ("seed", result.seed),
            ("records sent", result.sent),
            *((key.replace("_", " "), value) for key, value in result.accounting.items()),
            *((key.replace("_", " "), value) for key, value in result.metrics.items()),
            *((key, value) for key, value in result.details.items()),
        ]
        for label, value in rows:
            table.add_row(label, str(value))
        console.print(table)
        for failure in result.failures:
            console.print(f"[red]  failed: {failure}[/red]")
    if failed:
        sys.exit(1)
