"""The records' own series, read from the database after the run: exact, and cheap.

Every enrichment carries its commit time, and every record its import's time; so each
committed product's latency (its import accepted → its enrichment committed) is known
exactly, and the run needs no sampling for it:

    records/s      enrichments committed in each second of the run
    latency        p50 and p99 of the latencies of the enrichments committed in that
                   second (a second with none is a gap, not a zero)

Seconds are counted from the run's start (``started_wall``, the run's wall clock at its
monotonic start): the database's timestamps are wall-clock times.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from aura.catalog import Enrichment, Import, ImportRecord
from aura.timeline.series import Group

__all__ = ["commit_latencies", "per_second", "percentile", "record_groups"]

_MAX_SECONDS = 20_000  # buckets: a run longer than this is cut, not grown without bound


def percentile(values: Sequence[float], percent: float) -> float | None:
    """The ``percent`` percentile of ``values`` (linear between ranks); None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * percent / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def per_second(points: Sequence[tuple[float, float]], duration_s: float) -> list[Group]:
    """``points`` (commit second since the start, latency in seconds) as the two charts:
    records/s, and p50/p99 latency, one x a second (at its middle) up to
    ``duration_s`` or the last commit."""
    last = max([duration_s, *(at for at, _ in points)], default=0.0)
    seconds = min(math.ceil(last), _MAX_SECONDS)
    buckets: list[list[float]] = [[] for _ in range(seconds)]
    for at, latency in points:
        index = int(at)
        if 0 <= index < seconds:
            buckets[index].append(latency)
    rate = Group("rate", "Records committed per second", "records/s")
    delay = Group("latency", "Latency, import to enrichment commit", "s")
    for index, bucket in enumerate(buckets):
        rate.add(index + 0.5, {"records/s": float(len(bucket))})
        delay.add(index + 0.5, {"p50": percentile(bucket, 50), "p99": percentile(bucket, 99)})
    return [rate, delay]


def _utc(stamp: datetime) -> datetime:
    return stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=UTC)  # SQLite's


async def commit_latencies(
    session: AsyncSession, tenant_id: uuid.UUID, import_ids: Sequence[uuid.UUID]
) -> list[tuple[datetime, float]]:
    """Each enrichment of the run's imports: its commit time, its latency in seconds
    (from its record's import; the earliest, if two imports carried the product)."""
    rows = await session.execute(
        select(Enrichment.created_at, func.min(Import.created_at))
        .join(ImportRecord, ImportRecord.product_id == Enrichment.product_id)
        .join(Import, Import.id == ImportRecord.import_id)
        .where(Enrichment.tenant_id == tenant_id, Import.id.in_(import_ids))
        .group_by(Enrichment.product_id, Enrichment.created_at)
    )
    return [
        (_utc(done), (_utc(done) - _utc(imported)).total_seconds()) for done, imported in rows.all()
    ]


async def record_groups(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    import_ids: Sequence[uuid.UUID],
    *,
    started_wall: float,
    duration_s: float,
) -> list[Group]:
    """The records/s and latency charts of a run, from the database."""
    latencies = await commit_latencies(session, tenant_id, import_ids)
    points = [(done.timestamp() - started_wall, latency) for done, latency in latencies]
    return per_second(points, duration_s)
