"""``aura chaos``: run named fault scenarios on the real services (see ``aura.chaos``)."""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console
from rich.table import Table

from aura.cli import app
from aura.errors import InvalidInputError


@app.command("chaos")
def chaos_command(
    name: str = typer.Argument("", help="A scenario (see --list), or all."),
    list_them: bool = typer.Option(False, "--list", help="List the scenarios and stop."),
    products: int = typer.Option(0, help="Records per scenario (0: the scenario's default)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per scenario."),
) -> None:
    """Each scenario: a bounded load with one real fault, then an accounting. Exit code 1
    when any scenario fails (something lost, doubled, or a message's fate unexpected)."""
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
    names = list(SCENARIOS) if name == "all" else [name]
    if products < 0:
        raise InvalidInputError(f"--products must be >= 0, got {products}", field="products")
    console = Console(stderr=as_json)
    failed = 0
    for scenario_name in names:
        if not as_json:
            console.print(f"[bold]{scenario_name}[/bold]: {SCENARIOS[scenario_name].summary}")
        result = run_scenario(scenario_name, products=products or None)
        failed += not result.passed
        if as_json:
            typer.echo(json.dumps(result.as_dict()))
            continue
        table = Table(show_header=False)
        table.add_column(style="bold")
        table.add_column(justify="right")
        rows = [
            ("passed", "[green]yes[/green]" if result.passed else "[red]NO[/red]"),
            ("sent", result.sent),
            ("committed once", result.committed),
            *((f"in the DLQ: {reason}", n) for reason, n in result.dead_lettered.items()),
            ("duplicates", result.duplicates),
            ("lost", result.lost),
            ("retries / deferrals", f"{result.retries} / {result.deferrals}"),
            ("breaker opens", result.breaker_opens),
            ("elapsed", f"{result.elapsed_s} s"),
            ("throughput", f"{result.throughput_per_s} records/s"),
            ("latency p50 / p99", f"{result.latency_p50_s} s / {result.latency_p99_s} s"),
            *((key, value) for key, value in result.details.items()),
        ]
        for label, value in rows:
            table.add_row(label, str(value))
        console.print(table)
        for failure in result.failures:
            console.print(f"[red]  failed: {failure}[/red]")
    if failed:
        sys.exit(1)
