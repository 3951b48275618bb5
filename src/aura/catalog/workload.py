"""Each tenant's work at each stage, counted in one snapshot (``aura tenants`` shows it).

A tenant's catalog crosses the platform as two kinds of work, one message each: an import
record's ingest (``aura.ingest_product``, bulk_queue) and a product's enrichment
(``aura.enrich_product``, realtime_queue; one per product, whether the gateway took the
product alone or an import record made it). Each unit is at exactly one stage:

    stage          records (import records)             enrichments (products)
    queued         its message is in the outbox: held   its message is in the outbox
                   for fair dispatch, or staged and
                   not yet confirmed by the broker
    in flight      pending, its message published: in   no enrichment yet, not queued, not
                   the broker's queue, running,         dead-lettered: in the broker's queue,
                   retrying or deferred                 running, retrying or deferred
    done           status done (its product written)    the product has its enrichment
    dead-lettered  status dead_lettered                 a letter of aura.enrich_product for
                                                        the tenant in the DLQ store, not
                                                        replayed (``aura dlq`` files what
                                                        has landed; until then: in flight)

What it costs, so it can run against a large catalog: records are counted by the
``(import_id, status)`` index for the unfinished ones only (pending, dead-lettered), and
done is each import's ``accepted`` less those, so the done records are never read; the
outbox is read whole (it holds only what waits to be published); products and
enrichments are counted on their ``tenant_id`` indexes (index-only, linear in the
tenant's products); the DLQ store by its ``(source, status, task)`` index. Reading takes
no row lock and writes nothing: the caller runs it in one read-only transaction
(``aura.cli.tenants``), so every number comes from the same snapshot.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import InstrumentedAttribute

from aura.catalog.models import Enrichment, Import, ImportRecord, Product, Tenant
from aura.contract import ENRICH_TASK, INGEST_TASK
from aura.db import OutboxMessage
from aura.db.tables import DEAD, dead_letters

__all__ = [
    "REQUIRED_TABLES",
    "Stages",
    "TenantWork",
    "dead_enrichments",
    "tenant_work",
]

REQUIRED_TABLES = ("tenants", "products", "enrichments", "imports", "import_records", "outbox")
"""The tables the counts read (a database without them has no platform schema)."""


@dataclass(frozen=True)
class Stages:
    """Units of one kind of work (or of both) at each stage."""

    queued: int = 0
    in_flight: int = 0
    done: int = 0
    dead_lettered: int = 0

    def __add__(self, other: Stages) -> Stages:
        return Stages(
            self.queued + other.queued,
            self.in_flight + other.in_flight,
            self.done + other.done,
            self.dead_lettered + other.dead_lettered,
        )

    @property
    def busy(self) -> int:
        """Work not finished: queued and in flight."""
        return self.queued + self.in_flight


@dataclass(frozen=True)
class TenantWork:
    tenant_id: uuid.UUID
    name: str
    records: Stages
    enrichments: Stages

    @property
    def total(self) -> Stages:
        return self.records + self.enrichments


async def _counts(
    connection: AsyncConnection, statement: Select[uuid.UUID, int]
) -> Counter[uuid.UUID]:
    rows = await connection.execute(statement)
    return Counter({tenant: int(n or 0) for tenant, n in rows.all()})


async def _records(
    connection: AsyncConnection, ids: Collection[uuid.UUID] | None
) -> tuple[Counter[uuid.UUID], Counter[uuid.UUID], Counter[uuid.UUID]]:
    """Accepted, pending and dead-lettered records by tenant: the imports (a row each),
    joined to their unfinished records only (the (import_id, status) index)."""
    accepted = select(Import.tenant_id, func.sum(Import.accepted)).group_by(Import.tenant_id)
    unfinished = (
        select(Import.tenant_id, ImportRecord.status, func.count())
        .join(ImportRecord, ImportRecord.import_id == Import.id)
        .where(ImportRecord.status.in_(("pending", "dead_lettered")))
        .group_by(Import.tenant_id, ImportRecord.status)
    )
    if ids is not None:
        accepted = accepted.where(Import.tenant_id.in_(ids))
        unfinished = unfinished.where(Import.tenant_id.in_(ids))
    pending: Counter[uuid.UUID] = Counter()
    dead: Counter[uuid.UUID] = Counter()
    for tenant, status, n in (await connection.execute(unfinished)).all():
        (pending if status == "pending" else dead)[tenant] += int(n)
    return await _counts(connection, accepted), pending, dead


async def _outbox(
    connection: AsyncConnection, ids: Collection[uuid.UUID] | None
) -> dict[str, Counter[uuid.UUID]]:
    """The tenants' messages not yet published, by task."""
    statement = select(OutboxMessage.tenant_id, OutboxMessage.task, func.count()).group_by(
        OutboxMessage.tenant_id, OutboxMessage.task
    )
    if ids is not None:
        statement = statement.where(OutboxMessage.tenant_id.in_(ids))
    queued: dict[str, Counter[uuid.UUID]] = {INGEST_TASK: Counter(), ENRICH_TASK: Counter()}
    for tenant, task, n in (await connection.execute(statement)).all():
        queued.setdefault(task, Counter())[tenant] += int(n)
    return queued


def _by_tenant(
    column: InstrumentedAttribute[uuid.UUID], ids: Collection[uuid.UUID] | None
) -> Select[uuid.UUID, int]:
    """Rows by tenant, counted on the ``tenant_id`` index (index-only)."""
    statement = select(column, func.count()).group_by(column)
    return statement if ids is None else statement.where(column.in_(ids))


async def tenant_work(
    connection: AsyncConnection,
    tenant_ids: Collection[uuid.UUID] | None = None,
    dead_letters_by_tenant: Mapping[str, int] | None = None,
) -> list[TenantWork]:
    """Every tenant's work (or only ``tenant_ids``'), by kind and stage, ordered by name.
    ``dead_letters_by_tenant`` is ``dead_enrichments``' answer (tenant id as text), read
    from the DLQ store, which may be another database; without it none is dead-lettered."""
    ids = None if tenant_ids is None else list(tenant_ids)
    names = select(Tenant.id, Tenant.name).order_by(Tenant.name)
    if ids is not None:
        names = names.where(Tenant.id.in_(ids))
    tenants = (await connection.execute(names)).all()
    accepted, pending, dead = await _records(connection, ids)
    queued = await _outbox(connection, ids)
    products = await _counts(connection, _by_tenant(Product.tenant_id, ids))
    enriched = await _counts(connection, _by_tenant(Enrichment.tenant_id, ids))
    letters = dead_letters_by_tenant or {}
    found = []
    for tenant_id, name in tenants:
        waiting = queued[INGEST_TASK][tenant_id]
        records = Stages(
            queued=waiting,
            in_flight=max(pending[tenant_id] - waiting, 0),
            done=max(accepted[tenant_id] - pending[tenant_id] - dead[tenant_id], 0),
            dead_lettered=dead[tenant_id],
        )
        to_enrich, failed = queued[ENRICH_TASK][tenant_id], letters.get(str(tenant_id), 0)
        unfinished = products[tenant_id] - enriched[tenant_id]
        enrichments = Stages(
            queued=to_enrich,
            in_flight=max(unfinished - to_enrich - failed, 0),
            done=enriched[tenant_id],
            dead_lettered=failed,
        )
        found.append(TenantWork(tenant_id, name, records, enrichments))
    return found


async def dead_enrichments(
    connection: AsyncConnection,
    source: str | None = None,
    tenant_ids: Collection[uuid.UUID] | None = None,
) -> dict[str, int]:
    """The DLQ store's letters of ``aura.enrich_product`` not replayed, by tenant (its id
    as text): one per message. ``source`` is the broker's vhost (None: every broker's)."""
    c = dead_letters.c
    statement = (
        select(c.tenant_id, func.count(func.distinct(c.message_id)))
        .where(c.status == DEAD, c.task == ENRICH_TASK, c.tenant_id.is_not(None))
        .group_by(c.tenant_id)
    )
    if source is not None:
        statement = statement.where(c.source == source)
    if tenant_ids is not None:
        statement = statement.where(c.tenant_id.in_([str(t) for t in tenant_ids]))
    rows = await connection.execute(statement)
    return {str(tenant): int(n) for tenant, n in rows.all()}
