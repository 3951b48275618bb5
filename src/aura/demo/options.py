"""What a demo run is asked to do: its options, the fault profiles the simulator plays,
the environment that scales the worker's timeouts for a one-minute run, and the records
it imports (the bundled sample catalog)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from aura.demo.report import Tally
from aura.errors import InvalidInputError
from aura.llm import Faults

__all__ = [
    "DEMO_ENVIRONMENT",
    "FAULT_PROFILES",
    "MAX_PRODUCTS",
    "DemoOptions",
    "Profile",
    "catalog_records",
    "demo_environment",
]


@dataclass(frozen=True)
class Profile:
    faults: Faults
    outage_s: float  # one outage, longer than the demo's breaker reset timeout


FAULT_PROFILES: dict[str, Callable[[], Profile]] = {
    "off": lambda: Profile(Faults(), 0.0),
    "default": lambda: Profile(
        Faults(
            latency=0.005,
            jitter=0.01,
            error_rate=0.05,
            error_statuses=(500, 503, 429),
            retry_after=1.0,
            hang_rate=0.01,
            hang_seconds=3.0,
        ),
        4.0,
    ),
    "heavy": lambda: Profile(
        Faults(
            latency=0.005,
            jitter=0.02,
            error_rate=0.15,
            error_statuses=(500, 502, 503, 429),
            retry_after=1.0,
            hang_rate=0.03,
            hang_seconds=3.0,
            reset_rate=0.03,
            malformed_rate=0.02,
        ),
        6.0,
    ),
}
# Scaled for a one-minute run; the seed's values stay the defaults everywhere else.
DEMO_ENVIRONMENT = {
    "LLM_READ_TIMEOUT": "1",
    "LLM_CALL_DEADLINE": "2.5",
    "CIRCUIT_BREAKER_RESET_TIMEOUT": "3",
    "CELERY_TASK_SOFT_TIME_LIMIT": "20",
    "CELERY_TASK_HARD_TIME_LIMIT": "30",
    "OUTBOX_RELAY_INTERVAL": "1",
    "OUTBOX_RELAY_MIN_AGE": "3",
}
MAX_PRODUCTS = 20_000


def demo_environment(llm_latency: float) -> dict[str, str]:
    """DEMO_ENVIRONMENT, with the LLM timeouts above the simulated latency: a read
    timeout of 1 s cut every answer of ``--llm-latency 1`` (each call timed out, the
    breaker opened, records were dead-lettered with their deferrals spent)."""
    environment = dict(DEMO_ENVIRONMENT)
    read = max(float(DEMO_ENVIRONMENT["LLM_READ_TIMEOUT"]), 2 * llm_latency + 0.5)
    deadline = max(float(DEMO_ENVIRONMENT["LLM_CALL_DEADLINE"]), 2 * read + 0.5)
    environment["LLM_READ_TIMEOUT"] = f"{read:g}"
    environment["LLM_CALL_DEADLINE"] = f"{deadline:g}"
    return environment


@dataclass(frozen=True)
class DemoOptions:
    products: int = 1200
    faults: str = "default"
    progress: Callable[[Tally, int], None] | None = None  # (counts, enrich dead letters)
    concurrency: int = 50  # tasks in flight in the worker's async pool
    llm_latency: float | None = None  # seconds per LLM answer (real calls take 0.3-5 s)
    report_dir: Path | None = None  # a timeline report (``aura.timeline``) written there

    def __post_init__(self) -> None:
        if not 1 <= self.products <= MAX_PRODUCTS:
            raise InvalidInputError(
                f"--products must be between 1 and {MAX_PRODUCTS}, got {self.products}",
                field="products",
            )
        if not 1 <= self.concurrency <= 2000:
            raise InvalidInputError(
                f"--concurrency must be between 1 and 2000, got {self.concurrency}",
                field="concurrency",
            )
        if self.llm_latency is not None and not 0 <= self.llm_latency <= 60:
            raise InvalidInputError(
                f"--llm-latency must be between 0 and 60 seconds, got {self.llm_latency}",
                field="llm_latency",
            )
        if self.faults not in FAULT_PROFILES:
            raise InvalidInputError(
                f"--faults must be one of {', '.join(FAULT_PROFILES)}, got {self.faults!r}",
                field="faults",
            )


def catalog_records(count: int) -> list[str]:
    """``count`` raw records from the bundled sample catalog (about 3 % malformed);
    past its end, the catalog repeats with new SKUs."""
    text = resources.files("aura.demo").joinpath("sample_catalog.jsonl").read_text()
    base = [line for line in text.splitlines() if line.strip()]
    records = []
    for index in range(count):
        line = base[index % len(base)]
        cycle = index // len(base)
        records.append(line if cycle == 0 else line.replace('"SMP-', f'"SMP{cycle}-'))
    return records
