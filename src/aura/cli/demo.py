"""``aura demo``: the main job. Imports a sample catalog through every seed pattern and
reports where each record ended up (see ``aura.demo``)."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import typer

from aura.cli import app
from aura.cli.extras import needs_extra

__all__ = ["demo_command"]

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.console import Console
    from rich.progress import Progress

    from aura.demo import DemoReport
    from aura.demo.report import Tally


@app.command("demo")
@needs_extra("demo")
def demo_command(
    products: int = typer.Option(1200, help="How many catalog records to import (max 20,000)."),
    faults: str = typer.Option("default", help="LLM faults to inject: off, default or heavy."),
    as_json: bool = typer.Option(False, "--json", help="Print only the report, as JSON."),
    concurrency: int = typer.Option(
        50, help="LLM calls in flight in the real services' async worker (1 to 2,000)."
    ),
    llm_latency: float | None = typer.Option(
        None, help="Seconds the simulated LLM takes per answer (real ones take 0.3-5)."
    ),
    report: str = typer.Option(
        "", "--report", metavar="DIR", help="Write the run's HTML timeline (and its JSON) there."
    ),
) -> None:
    """Import a sample catalog through the gateway, worker and LLM simulator; report."""
    from rich.console import Console

    from aura.cli.failures import check_broker
    from aura.config import get_settings
    from aura.demo import DemoOptions, run_demo
    from aura.timeline import report_directory

    report_dir = report_directory(report)
    settings = get_settings()
    if settings.database_url and settings.redis_url and settings.celery_broker_url:
        # On the real services: a broker that is down is one line now, not a run that
        # waits on it for ever (its gateway keeps the imports in the outbox, retrying).
        check_broker(settings.celery_broker_url)
    console = Console(stderr=as_json)
    progress, show = _progress(console, products, disable=as_json)
    options = DemoOptions(
        products=products,
        faults=faults,
        progress=show,
        concurrency=concurrency,
        llm_latency=llm_latency,
        report_dir=report_dir,
    )
    with progress:
        outcome = run_demo(options)
    if as_json:
        typer.echo(json.dumps(outcome.as_dict(), indent=2))
    else:
        _print(console, outcome)
    if report_dir is not None:
        console.print(f"report: {report_dir / 'index.html'}")
    if outcome.lost or outcome.duplicates:
        sys.exit(1)


def _progress(
    console: Console, products: int, *, disable: bool
) -> tuple[Progress, Callable[[Tally, int], None]]:
    """The two progress bars (ingested, enriched) and the callback that moves them."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    progress = Progress(
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=disable,
        transient=False,
    )
    ingest = progress.add_task("ingested", total=products)
    enrich = progress.add_task("enriched", total=None)

    def show(counts: Tally, enrich_dead: int) -> None:
        progress.update(ingest, completed=counts.done + counts.dead_lettered)
        progress.update(enrich, total=max(counts.done, 1), completed=counts.enriched + enrich_dead)

    return progress, show


def _rows(report: DemoReport) -> list[tuple[str, object]]:
    """The report's table, a row a count."""
    rows: list[tuple[str, object]] = [
        ("accepted", report.accepted),
        ("ingested (products written once)", report.ingested),
        ("enriched by the LLM", report.enriched),
        *((f"in the DLQ: {reason}", n) for reason, n in report.dead_lettered.items()),
        ("retries spent", report.retries),
        ("deferred while the breaker was open", report.deferrals),
        ("breaker opens", report.breaker_opens),
        ("LLM requests sent", report.llm_requests),
        (
            "  = enrichments + failed requests retried + extra",
            f"{report.enriched} + {report.llm_failed} + {report.llm_extra}",
        ),
        ("lost (must be 0)", report.lost),
        ("duplicates (must be 0)", report.duplicates),
        ("throughput", f"{report.throughput_per_s} products/s"),
        (
            "latency, import to enrichment, p50 / p99",
            f"{report.latency_p50_s} s / {report.latency_p99_s} s",
        ),
        ("elapsed", f"{report.elapsed_s} s"),
        (
            "worker tasks in flight / LLM latency",
            f"{report.concurrency} / {report.llm_latency_s} s",
        ),
    ]
    if report.worker_cpu_ms_per_record is not None:
        rows.append(("worker CPU per product", f"{report.worker_cpu_ms_per_record} ms"))
    return rows


def _print(console: Console, report: DemoReport) -> None:
    from rich.table import Table

    table = Table(title=f"Aura demo ({report.mode}, faults: {report.faults})", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for name, value in _rows(report):
        table.add_row(name, str(value))
    console.print(table)
    if report.dead_letter_samples:
        samples = Table(title="one dead letter of each kind", title_justify="left")
        for column in ("reason", "task", "error"):
            samples.add_column(column, overflow="fold")
        for sample in report.dead_letter_samples:
            samples.add_row(sample["reason"], sample["task"], sample["error"])
        console.print(samples)
    _print_verdict(console, report)


def _print_verdict(console: Console, report: DemoReport) -> None:
    """Lost or doubled, where the log is, and where to look next."""
    verdict = "[green]nothing lost, nothing doubled[/green]"
    if report.lost or report.duplicates:
        verdict = "[red]LOST OR DUPLICATED RECORDS: see above[/red]"
    console.print(verdict)
    console.print(f"Every retry, deferral and dead letter is logged in {report.log_path}.")
    if report.mode == "embedded":
        console.print(
            "Where to look next: with DATABASE_URL, REDIS_URL and CELERY_BROKER_URL set, the "
            "same job runs on the real services with real worker processes, and "
            "`aura dlq ls --reason poison_pill` lists what was dead-lettered (the embedded "
            "DLQ lives only as long as the demo)."
        )
    else:
        console.print(
            f"Where to look next: `aura dlq ls --tenant {report.tenant_id}`, `aura dlq show ID`, "
            "`aura dlq replay ID`."
        )
