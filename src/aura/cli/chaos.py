"""``aura chaos``: run named fault scenarios on the real services (see ``aura.chaos``)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import typer

from aura.cli import app
from aura.cli.extras import needs_extra
from aura.errors import AuraError, InvalidInputError

__all__ = ["chaos_command"]

if TYPE_CHECKING:
    from rich.console import Console

    from aura.chaos import ChaosResult


def _interrupt_on_sigterm() -> None:
    """SIGTERM ends a run as Ctrl-C does: the run's own stack is removed on the way out."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


@app.command("chaos")
@needs_extra("chaos")
def chaos_command(
    name: str = typer.Argument("", help="A scenario (see --list), or all."),
    list_them: bool = typer.Option(False, "--list", help="List the scenarios and stop."),
    products: int = typer.Option(0, help="Records per scenario (0: the scenario's default)."),
    seed: int = typer.Option(-1, help="Seed for the run's faults (default: a random one)."),
    as_json: bool = typer.Option(
        False, "--json", help="A scenario's result as JSON; with all, one report of them all."
    ),
    llm_latency: float = typer.Option(
        -1.0, "--llm-latency", help="Seconds per simulated LLM answer (default: the scenario's)."
    ),
    concurrency: int = typer.Option(
        0, help="Worker tasks in flight (async pool) or processes (prefork); 0: default."
    ),
    report: str = typer.Option(
        "", "--report", metavar="DIR", help="Write an HTML timeline per scenario and an index."
    ),
) -> None:
    """Each scenario: a bounded load with one real fault on the run's own database, vhost
    and Redis, then heal, drain and an accounting of every message. Exit code 1 when any
    scenario fails (a message lost, stranded, doubled, or its fate unexpected)."""
    from rich.console import Console

    from aura.chaos import SCENARIOS, chaos_report
    from aura.timeline import report_directory

    if list_them:
        for scenario in SCENARIOS.values():
            typer.echo(f"{scenario.name:<16} {scenario.summary}")
        return
    _check(name, products, seed, llm_latency, concurrency)
    report_dir = report_directory(report)
    _interrupt_on_sigterm()
    names = list(SCENARIOS) if name == "all" else [name]
    # One seed for the whole run, printed with every scenario.
    seed = seed if seed >= 0 else int.from_bytes(os.urandom(3), "big")
    console = Console(stderr=as_json)
    results = []
    started = time.monotonic()
    for scenario_name in names:
        console.print(f"[bold]{scenario_name}[/bold]: {SCENARIOS[scenario_name].summary}")
        result = _run_one(scenario_name, products, seed, llm_latency, concurrency, report_dir)
        results.append(result)
        if not as_json:
            _print_result(console, result)
        elif name != "all":
            typer.echo(json.dumps(result.as_dict()))
        else:
            console.print(f"  {'passed' if result.passed else 'FAILED'}: {result.failures}")
    if as_json and name == "all":
        typer.echo(json.dumps(chaos_report(results, time.monotonic() - started)))
    elif name == "all":
        _print_summary(console, results, seed)
    if report_dir is not None:
        console.print(f"report: {_write_index(report_dir, results, seed)}")
    if not all(result.passed for result in results):
        sys.exit(1)


def _check(name: str, products: int, seed: int, llm_latency: float, concurrency: int) -> None:
    """The options' bounds (InvalidInputError, naming the option, when one is off)."""
    from aura.chaos import SCENARIOS

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
    if llm_latency != -1.0 and not 0 <= llm_latency <= 60:
        raise InvalidInputError(
            f"--llm-latency must be between 0 and 60 seconds, got {llm_latency}",
            field="llm_latency",
        )
    if not 0 <= concurrency <= 500:
        raise InvalidInputError(
            f"--concurrency must be between 1 and 500, got {concurrency}", field="concurrency"
        )


def _write_index(directory: Path, results: list[ChaosResult], seed: int) -> Path:
    """DIR/index.html: a row a scenario, linked to its page (none for a crashed run)."""
    from aura.chaos import SCENARIOS
    from aura.timeline import IndexEntry, write_index
    from aura.timeline.html import file_stem

    entries = []
    for result in results:
        page = f"{file_stem(result.scenario)}.html"
        entries.append(
            IndexEntry(
                result.scenario,
                result.passed,
                SCENARIOS[result.scenario].summary,
                page if (directory / page).exists() else None,
            )
        )
    return write_index(directory, entries, f"aura chaos (seed {seed})")


def _run_one(
    name: str,
    products: int,
    seed: int,
    llm_latency: float,
    concurrency: int,
    report: Path | None = None,
) -> ChaosResult:
    """One scenario's result; a crash is a failed result, not the end of the run."""
    from aura.chaos import ChaosResult, run_scenario
    from aura.timeline.html import file_stem

    if report is not None:  # a page left by an earlier run must not stand for this one
        for suffix in (".html", ".json"):
            (report / f"{file_stem(name)}{suffix}").unlink(missing_ok=True)
    try:
        return run_scenario(
            name,
            products=products or None,
            seed=seed,
            llm_latency=None if llm_latency == -1.0 else llm_latency,
            concurrency=concurrency or None,
            report=report,
        )
    except AuraError:
        raise  # the configuration or the input: every scenario would fail alike
    except Exception as exc:  # one scenario's crash must not hide the others' results
        return ChaosResult.crashed(name, seed, exc)


def _print_result(console: Console, result: ChaosResult) -> None:
    """One scenario's result as a table, its failures below it."""
    from rich.table import Table

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


def _print_summary(console: Console, results: list[ChaosResult], seed: int) -> None:
    """``aura chaos all``'s table: a row a scenario."""
    from rich.table import Table

    summary = Table(title=f"aura chaos all (seed {seed})")
    columns = ("scenario", "passed", "committed", "lost", "stranded", "doubled", "rec/s")
    for column in (*columns, "p50 s", "p99 s", "CPU ms/rec"):
        summary.add_column(column)
    for result in results:
        counted, speed = result.accounting, result.performance()
        summary.add_row(
            result.scenario, "yes" if result.passed else "[red]NO[/red]",
            str(counted.get("committed_once")), str(counted.get("lost")),
            str(counted.get("stranded")), str(counted.get("duplicated")),
            str(speed["records_per_s"]), str(speed["latency_p50_s"]),
            str(speed["latency_p99_s"]), str(speed["worker_cpu_ms_per_record"]),
        )  # fmt: skip
    console.print(summary)
