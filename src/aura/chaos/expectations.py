"""What scenarios expect of an accounting, beyond its invariants: each a list of failures
(empty when met), so a scenario's ``expect`` adds them up."""

from __future__ import annotations

from aura.chaos.accounting import Accounting

__all__ = ["all_committed", "expect_letters", "extra_calls"]


def all_committed(accounting: Accounting, records: list[str]) -> list[str]:
    """Every record ingested and enriched once; no dead letter."""
    failures = []
    if accounting.committed_once != 2 * len(records):
        failures.append(f"committed {accounting.committed_once} of {2 * len(records)} messages")
    if accounting.dead_lettered:
        failures.append(f"unexpected dead letters: {accounting.dead_lettered}")
    return failures


def expect_letters(accounting: Accounting, good: int, letters: dict[str, int]) -> list[str]:
    """``good`` records committed once (ingest and enrichment), and exactly ``letters``
    (by reason) dead-lettered."""
    failures = []
    if accounting.dead_lettered != letters:
        failures.append(f"expected dead letters {letters}, got {accounting.dead_lettered}")
    if accounting.committed_once != 2 * good:
        failures.append(f"committed {accounting.committed_once} of {2 * good} messages")
    return failures


def extra_calls(accounting: Accounting, allowed: int = 0) -> list[str]:
    """No more than ``allowed`` LLM calls beyond one per enrichment and failure."""
    if accounting.llm_extra > allowed:
        return [f"{accounting.llm_extra} LLM calls beyond one per enrichment and failure"]
    return []
