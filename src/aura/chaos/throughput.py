"""Throughput around a fault, from the database's own timestamps.

The high-availability scenarios (a broker node, the Redis primary or the PostgreSQL
primary lost mid-run) are judged by how the work flows through the loss, not only by the
accounting at the end. Every enrichment row carries its ``created_at`` (the database's
clock, in the transaction that wrote it), so after the run the rate at any moment is
exact, with nothing sampled while the fault is on (a sampler that reads the database
sees nothing while the database itself fails over). A fault's moment is taken on the
same clock (``database_clock``; ``rate`` and the rest work in its epoch seconds):

    rate               enrichments/s with a stamp in [start, end)
    recovered_after    seconds from the fault until a ``window`` runs at ``share`` (90 %)
                       of the rate before it; None if none does
    timeline           enrichments per whole second around the fault
    around             the figures a scenario reports, in one dict
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import text

from aura.db import Database

__all__ = [
    "around",
    "database_clock",
    "enriched_stamps",
    "rate",
    "recovered_after",
    "timeline",
]

_ENRICHED = (
    "SELECT extract(epoch FROM created_at)::float8 FROM enrichments WHERE tenant_id = :tenant"
)
_CLOCK = "SELECT extract(epoch FROM clock_timestamp())::float8"


async def enriched_stamps(database: Database, tenant: uuid.UUID) -> list[float]:
    """When each of ``tenant``'s enrichments was written (the database's epoch seconds)."""
    async with database.reader.connect() as connection:
        rows = await connection.execute(text(_ENRICHED), {"tenant": tenant})
        return [float(row[0]) for row in rows]


async def database_clock(database: Database) -> float:
    """The database's clock now (epoch seconds): a fault's moment on the stamps' clock."""
    async with database.reader.connect() as connection:
        return float((await connection.execute(text(_CLOCK))).scalar_one())


def rate(stamps: list[float], start: float, end: float) -> float:
    """Events per second with a stamp in [start, end)."""
    if end <= start:
        return 0.0
    return sum(1 for stamp in stamps if start <= stamp < end) / (end - start)


def recovered_after(
    stamps: list[float],
    since: float,
    baseline: float,
    *,
    share: float = 0.9,
    window: float = 2.0,
    step: float = 0.1,
) -> float | None:
    """Seconds from ``since`` to the start of the first ``window`` whose rate is at least
    ``share`` of ``baseline``; None when none is (the windows run to the last stamp)."""
    last = max(stamps, default=since)
    offset = 0.0
    while since + offset + window <= last + step:
        if rate(stamps, since + offset, since + offset + window) >= share * baseline:
            return round(offset, 2)
        offset += step
    return None


def timeline(stamps: list[float], since: float, before: int, after: int) -> list[int]:
    """Events per whole second, from ``before`` seconds before ``since`` to ``after``."""
    return [
        sum(1 for stamp in stamps if since + second <= stamp < since + second + 1)
        for second in range(-before, after)
    ]


def around(
    stamps: list[float],
    fault_at: float,
    fault_ends: float | None = None,
    *,
    baseline_s: float = 8.0,
    window_s: float = 2.0,
    share: float = 0.9,
) -> dict[str, Any]:
    """The figures around a fault at ``fault_at`` (ending at ``fault_ends``, if it does):
    the rate before it, during it (until it ends, or until the rate is back: a window at
    least), when the rate was back to ``share`` of before, and a per-second timeline."""
    before = rate(stamps, fault_at - baseline_s, fault_at)
    recovered = recovered_after(stamps, fault_at, before, share=share, window=window_s)
    until = fault_ends or fault_at + max(recovered or 0.0, window_s)
    return {
        "records_per_s_before": round(before, 1),
        "records_per_s_during_fault": round(rate(stamps, fault_at, max(until, fault_at + 1)), 1),
        "recovered_after_s": recovered,
        "records_per_s_timeline": timeline(stamps, fault_at, 5, 20),
        "enriched_after_fault": sum(1 for stamp in stamps if stamp >= fault_at),
    }
