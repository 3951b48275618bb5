"""A scenario's result (its accounting, metrics, failures and details) and the report of
a whole ``aura chaos all`` run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ChaosResult", "chaos_report"]


@dataclass
class ChaosResult:
    scenario: str
    passed: bool
    seed: int
    sent: int  # records imported through the gateway
    accounting: dict[str, Any]
    metrics: dict[str, int]
    failures: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def crashed(cls, scenario: str, seed: int, exc: BaseException) -> ChaosResult:
        """A scenario that raised instead of ending in an accounting: failed."""
        return cls(
            scenario=scenario,
            passed=False,
            seed=seed,
            sent=0,
            accounting={},
            metrics={},
            failures=[f"crashed: {type(exc).__name__}: {str(exc)[:300]}"],
        )

    def performance(self) -> dict[str, Any]:
        """Throughput, latency, the worker's CPU per record, and the knobs they ran with."""
        keys = (
            "elapsed_s", "records_per_s", "latency_p50_s", "latency_p99_s", "worker_cpu_s",
            "worker_cpu_ms_per_record", "llm_latency_s", "concurrency", "worker_pool",
        )  # fmt: skip
        return {key: self.details.get(key) for key in keys}


def chaos_report(results: list[ChaosResult], elapsed_s: float) -> dict[str, Any]:
    """``aura chaos all --json``: every scenario's accounting and performance, and a verdict."""
    return {
        "passed": all(result.passed for result in results),
        "elapsed_s": round(elapsed_s, 1),
        "scenarios": len(results),
        "failed": [result.scenario for result in results if not result.passed],
        "results": [
            {
                "scenario": result.scenario,
                "passed": result.passed,
                "seed": result.seed,
                "sent": result.sent,
                "failures": result.failures,
                "accounting": result.accounting,
                "performance": result.performance(),
                "metrics": result.metrics,
                "details": result.details,
            }
            for result in results
        ],
    }
