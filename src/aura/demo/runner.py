"""Running the demo: embedded (one process, no servers) or on the real services.

Embedded (no DATABASE_URL / REDIS_URL / CELERY_BROKER_URL): SQLite in a temporary
folder, Celery's in-memory broker with a worker thread in this process, the in-process
Redis stand-in, the LLM simulator on loopback; the worker thread runs the async pool,
``--concurrency`` tasks in flight (50). Real services (all three set): the same job with
real async-pool worker processes (one per core, two at most).

Either way the demo shortens the LLM timeouts and the breaker's reset timeout (through
the environment the worker reads, as a deployment would) so a run takes about 20 s.
With ``report_dir`` the run samples itself and writes its timeline there (``demo.html``,
``demo.json``, ``index.html``: ``aura.timeline``), the LLM outage shaded on it.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from aura.config import get_settings
from aura.demo.harness import environment, logs_to
from aura.demo.import_run import ImportRun
from aura.demo.options import (
    DEMO_ENVIRONMENT,
    FAULT_PROFILES,
    MAX_PRODUCTS,
    DemoOptions,
    Profile,
    catalog_records,
    demo_environment,
)
from aura.demo.report import DemoReport, Tally
from aura.errors import ConfigurationError
from aura.llm import LLMSimulator
from aura.timeline import IndexEntry, Source, write_index, write_report
from aura.timeline.series import table_rows

__all__ = [
    "DEMO_ENVIRONMENT",
    "FAULT_PROFILES",
    "MAX_PRODUCTS",
    "DemoOptions",
    "ImportRun",
    "Profile",
    "catalog_records",
    "demo_environment",
    "report_json",
    "run_demo",
]


_SIMULATOR_SEED = 7


def run_demo(options: DemoOptions) -> DemoReport:
    """One demo run (embedded, or on the real services when all three URLs are set)."""
    settings = get_settings()
    real = [settings.database_url, settings.redis_url, settings.celery_broker_url]
    if any(real) and not all(real):
        raise ConfigurationError(
            "set all of DATABASE_URL, REDIS_URL and CELERY_BROKER_URL for the real services, "
            "or none of them for the embedded demo"
        )
    profile = FAULT_PROFILES[options.faults]()
    if settings.llm_base_url is not None:  # a real provider: nothing to inject
        profile = FAULT_PROFILES["off"]()
    if options.llm_latency is not None:
        profile.faults.latency = options.llm_latency
    log_path = Path(".aura", "demo.log").resolve()
    log_path.parent.mkdir(exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="aura-demo-") as scratch,
        logs_to(log_path),
        LLMSimulator(profile.faults, seed=_SIMULATOR_SEED).running_in_thread() as simulator,
    ):
        values = demo_environment(profile.faults.latency)
        if settings.llm_base_url is None:
            values["LLM_BASE_URL"] = simulator.base_url
        if not all(real):
            values["DATABASE_URL"] = f"sqlite+aiosqlite:///{scratch}/demo.db"
        with environment(values):
            runner = _DemoRun(
                catalog_records(options.products),
                options.faults,
                simulator,
                Path(scratch),
                log_path,
                embedded=not all(real),
                progress=options.progress,
                outage_s=profile.outage_s,
                worker_concurrency=options.concurrency,
            )
            runner.recorder.enabled = options.report_dir is not None
            report = asyncio.run(runner.run())
            report.concurrency = options.concurrency
            report.llm_latency_s = profile.faults.latency
            if options.report_dir is not None:
                _write_report(options.report_dir, runner, report, options)
            return report


def _write_report(
    directory: Path, runner: ImportRun, report: DemoReport, options: DemoOptions
) -> IndexEntry:
    """``demo.html`` and ``demo.json`` in ``directory``, and its index."""
    rows = {k: v for k, v in report.as_dict().items() if k != "dead_letter_samples"}
    timeline = runner.recorder.timeline(
        "demo",
        summary=f"aura demo ({report.mode}): {options.products} records, faults {options.faults}",
        seed=_SIMULATOR_SEED,
        passed=not (report.lost or report.duplicates),
        table=table_rows(rows),
    )
    entry = write_report(directory, timeline)
    write_index(directory, [entry], "aura demo")
    return entry


def report_json(report: DemoReport) -> str:
    return json.dumps(report.as_dict(), indent=2)


class _DemoRun(ImportRun):
    """The demo: one LLM outage, started once 30 % of the records are written."""

    def __init__(self, *args: Any, outage_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outage_s = outage_s
        self.outage_started = outage_s == 0

    async def on_tick(self, counts: Tally) -> None:
        if not self.outage_started and counts.done >= counts.accepted * 0.3:
            self.simulator.start_outage(self.outage_s)
            self.outage_started = True
            now = self.recorder.elapsed()
            label = f"LLM outage ({self.outage_s:g} s)"
            self.recorder.add_window(label, now, now + self.outage_s, "fault")

    def timeline_sources(self) -> list[Source]:
        """The metrics; on the real services, the broker's queues too (its vhost)."""
        if self.embedded:
            return super().timeline_sources()
        from functools import partial

        from kombu.connection import Connection

        from aura.chaos.accounting import queue_depths
        from aura.timeline import queue_source

        url = self.settings.celery_broker_url
        vhost = Connection(url).virtual_host or "/"  # type: ignore[no-untyped-call]
        return [*super().timeline_sources(), queue_source(partial(queue_depths, vhost))]
