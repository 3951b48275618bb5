"""``aura demo``: the main job, on embedded defaults with no configuration.

It runs what exists today and reports it; each piece of the platform adds its step here
as it lands (see the README's pattern table for what is built).
"""

from __future__ import annotations

from prometheus_client import REGISTRY
from rich.console import Console
from rich.table import Table

from aura.cli import app
from aura.config import get_settings
from aura.metrics import SEED_METRIC_NAMES


def _exposed_metric_names() -> set[str]:
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


@app.command("demo")
def demo_command() -> None:
    """Run the main job on embedded defaults and print its report."""
    console = Console()
    settings = get_settings()
    console.rule("[bold]Aura demo")
    mode = "embedded" if settings.database_url is None else "real services"
    console.print(f"mode: [bold]{mode}[/bold]")

    exposed = _exposed_metric_names()
    table = Table(title="seed metrics exposed")
    table.add_column("metric")
    table.add_column("exposed")
    missing = 0
    for name in SEED_METRIC_NAMES:
        ok = name in exposed
        missing += not ok
        table.add_row(name, "yes" if ok else "[red]no[/red]")
    console.print(table)
    console.print(
        f"settings validated: {len(settings.as_display())} variables "
        "(see `aura config`); metrics missing: "
        f"{missing}"
    )
