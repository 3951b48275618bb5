"""``aura demo``: every seed pattern working together on a catalog import.

``run_demo(options)`` creates a tenant, imports the bundled sample catalog through the
gateway, lets the worker ingest and enrich it against the LLM simulator with injected
faults (and one outage long enough to open the breaker), and returns a ``DemoReport``:
accepted, enriched, dead-lettered by reason, retries, breaker opens, lost, duplicates,
throughput and latency.
"""

from aura.demo.report import DemoReport
from aura.demo.runner import FAULT_PROFILES, DemoOptions, run_demo

__all__ = ["FAULT_PROFILES", "DemoOptions", "DemoReport", "run_demo"]
