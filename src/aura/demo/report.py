"""The demo's accounting: what was accepted, and where every record ended up."""

from __future__ import annotations

import statistics
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from aura.catalog import Enrichment, Import, ImportRecord, Product

__all__ = ["DemoReport", "Tally", "percentile", "tally"]


@dataclass
class Tally:
    """Counts read from the database for one import."""

    accepted: int
    done: int
    dead_lettered: int
    pending: int
    products: int
    enriched: int
    latencies_s: list[float] = field(default_factory=list)


async def tally(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    import_ids: Sequence[uuid.UUID],
    *,
    latencies: bool = False,
) -> Tally:
    """The counts of a run's imports (one or more, all the tenant's); with ``latencies``,
    also each enrichment's time since the first import (one row per product: ask for it
    once, at the end, not at every look)."""
    batches = (await session.scalars(select(Import).where(Import.id.in_(import_ids)))).all()
    assert len(batches) == len(import_ids)
    statuses = dict(
        (
            await session.execute(
                select(ImportRecord.status, func.count())
                .where(ImportRecord.import_id.in_(import_ids))
                .group_by(ImportRecord.status)
            )
        ).all()
    )
    products = await session.scalar(
        select(func.count()).select_from(Product).where(Product.tenant_id == tenant_id)
    )
    enriched = await session.scalar(
        select(func.count()).select_from(Enrichment).where(Enrichment.tenant_id == tenant_id)
    )
    seconds: list[float] = []
    if latencies:
        started = min(batch.created_at for batch in batches)
        finished = await session.scalars(
            select(Enrichment.created_at).where(Enrichment.tenant_id == tenant_id)
        )
        seconds = [
            (stamp.replace(tzinfo=started.tzinfo) - started).total_seconds() for stamp in finished
        ]
    return Tally(
        accepted=sum(batch.accepted for batch in batches),
        done=int(statuses.get("done", 0)),
        dead_lettered=int(statuses.get("dead_lettered", 0)),
        pending=int(statuses.get("pending", 0)),
        products=int(products or 0),
        enriched=int(enriched or 0),
        latencies_s=seconds,
    )


@dataclass
class DemoReport:
    mode: str
    faults: str
    accepted: int
    ingested: int
    enriched: int
    dead_lettered: dict[str, int]
    retries: int
    deferrals: int
    breaker_opens: int
    llm_requests: int
    llm_failed: int  # requests the provider (the simulator) failed: each is retried
    lost: int
    duplicates: int
    elapsed_s: float
    throughput_per_s: float
    latency_p50_s: float
    latency_p99_s: float
    tenant_id: str
    log_path: str
    dead_letter_samples: list[dict[str, str]] = field(default_factory=list)
    concurrency: int = 1  # tasks in flight in the worker (its async pool's slots)
    llm_latency_s: float = 0.0  # the simulator's added latency per answer
    # The worker process's CPU (user + system, its children too) from the import's start
    # to the report, per enriched product; None where it cannot be read (the embedded
    # worker is a thread of this process; /proc is Linux's).
    worker_cpu_ms_per_record: float | None = None

    @classmethod
    def build(
        cls,
        *,
        mode: str,
        faults: str,
        counts: Tally,
        dead_lettered: dict[str, int],
        ingest_dead: int,
        enrich_dead: int,
        retries: int,
        deferrals: int,
        breaker_opens: int,
        llm_requests: int,
        llm_failed: int,
        elapsed_s: float,
        tenant_id: str,
        log_path: str,
        samples: list[dict[str, str]],
    ) -> DemoReport:
        # Lost: accepted records that neither made a product nor reached the DLQ, and
        # products that were neither enriched nor had their enrichment dead-lettered.
        lost = max(counts.accepted - counts.done - ingest_dead, 0) + max(
            counts.done - counts.enriched - enrich_dead, 0
        )
        duplicates = max(counts.products - counts.done, 0) + max(
            counts.enriched - counts.products, 0
        )
        latencies = sorted(counts.latencies_s)
        return cls(
            mode=mode,
            faults=faults,
            accepted=counts.accepted,
            ingested=counts.done,
            enriched=counts.enriched,
            dead_lettered=dict(sorted(dead_lettered.items())),
            retries=retries,
            deferrals=deferrals,
            breaker_opens=breaker_opens,
            llm_requests=llm_requests,
            llm_failed=llm_failed,
            lost=lost,
            duplicates=duplicates,
            elapsed_s=round(elapsed_s, 2),
            throughput_per_s=round(counts.enriched / elapsed_s, 1) if elapsed_s else 0.0,
            latency_p50_s=round(percentile(latencies, 50), 3),
            latency_p99_s=round(percentile(latencies, 99), 3),
            tenant_id=tenant_id,
            log_path=log_path,
            dead_letter_samples=samples,
        )

    @property
    def llm_extra(self) -> int:
        """LLM requests beyond one per enrichment plus one per failed request: calls made
        for work already done (must be 0 when nothing but the provider fails)."""
        return self.llm_requests - self.enriched - self.llm_failed

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"llm_extra": self.llm_extra}


def percentile(values: list[float], percent: int) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]
