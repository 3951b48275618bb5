"""The intelligence worker's tasks.

    aura.ingest_product   (bulk_queue)     one raw catalog record: parse, validate, write the
                                           product and its variants with the inbox, mark the
                                           import record done, then queue its enrichment
    aura.enrich_product   (realtime_queue) ask the LLM for a description and tags, write
                                           the enrichment with the inbox

Malformed records are poison pills (DLQ at once, import record marked dead_lettered); a
dropped database connection or an LLM failure is transient (retried); an open LLM
circuit defers the task. Each effect is committed once, whatever the redeliveries.

Both tasks read the inbox before they run (``DatabaseInbox``): a delivery whose effect is
committed makes no LLM call and writes nothing; a committed ingest only queues its
enrichment again (the publish after its commit may have been lost; the enrichment's own
inbox absorbs the twin). The same message id with another payload is dead-lettered as
``conflicting_message_id``.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from typing import Any

from celery import Task
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import Table, bindparam, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from aura.catalog import ProductIn, parse_record
from aura.config import get_settings
from aura.contract import ENRICH_TASK, INGEST_TASK
from aura.db import (
    Database,
    DatabaseInbox,
    Enrichment,
    ImportRecord,
    Product,
    Variant,
    claim_message,
    create_product_with_variants,
    mark_record,
    transactional,
)
from aura.errors import LLMMalformedResponseError, NotFoundError
from aura.events import DeadLetterReason
from aura.llm import ResilientLLMClient
from aura.messaging import DeadLetter, delivery_fingerprint, resilient_task
from aura.messaging.topology import BULK_QUEUE, REALTIME_QUEUE
from aura.worker.celery_app import celery_app

__all__ = ["app", "enrich_product", "ingest_product"]

_SYSTEM_PROMPT = (
    "You write product copy. Answer with JSON only: "
    '{"description": "<two sentences>", "tags": ["<tag>", ...]}'
)
_resources: dict[int, tuple[Database, ResilientLLMClient]] = {}


def _process_resources() -> tuple[Database, ResilientLLMClient]:
    """This process's database pool and LLM client (made on its event loop, kept)."""
    pid = os.getpid()
    if pid not in _resources:
        settings = get_settings()
        _resources[pid] = (Database.from_settings(settings), ResilientLLMClient(settings=settings))
    return _resources[pid]


_inbox = DatabaseInbox(lambda: _process_resources()[0])


class _EnrichmentAnswer(BaseModel):
    description: str = Field(min_length=1, max_length=2000)
    tags: list[str] = Field(default_factory=list, max_length=20)


@transactional
async def _ingest(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    product: ProductIn,
    *,
    message_id: str,
    fingerprint: str,
) -> uuid.UUID:
    if not await claim_message(
        session, message_id, task=INGEST_TASK, tenant_id=tenant_id, fingerprint=fingerprint
    ):
        # Redelivered after its commit: find what it made, so enrichment is still queued.
        made = await session.scalar(
            select(ImportRecord.product_id).where(ImportRecord.message_id == message_id)
        )
        if made is None:
            raise NotFoundError(f"message {message_id} was processed but made no product")
        return made
    created = await create_product_with_variants(session, tenant_id, product)
    await mark_record(session, message_id, "done", product_id=created.id)
    return created.id


async def _mark_dead(letter: DeadLetter) -> None:
    if letter.reason is DeadLetterReason.CONFLICTING_MESSAGE_ID:
        return  # the id's import record belongs to the payload committed under it
    database, _ = _process_resources()
    async with database.session() as session:
        await mark_record(session, letter.message_id, "dead_lettered")
        await session.commit()


async def _queue_enrichment(product_id: uuid.UUID | str, tenant_id: str) -> None:
    """Publish (confirmed) the product's enrichment, off the event loop: a blocking
    publish on it would stall every other task in flight (AsyncPool)."""
    await asyncio.to_thread(
        ingest_product.app.send_task,
        ENRICH_TASK,
        args=[str(product_id), tenant_id],
        task_id=f"enrich-{product_id}",
        queue=REALTIME_QUEUE,
    )


async def _requeue_enrichment(raw: str, tenant_id: str, import_id: str | None = None) -> None:
    """A committed ingest delivered again: queue its enrichment again, nothing else."""
    message_id = ingest_product.request.id
    database, _ = _process_resources()
    async with database.session() as session:
        made = await session.scalar(
            select(ImportRecord.product_id).where(ImportRecord.message_id == message_id)
        )
    if made is not None:
        await _queue_enrichment(made, tenant_id)


@resilient_task(
    name=INGEST_TASK,
    queue=BULK_QUEUE,
    on_dead_letter=_mark_dead,
    inbox=_inbox,
    on_duplicate=_requeue_enrichment,
)
async def ingest_product(self: Task, raw: str, tenant_id: str, import_id: str | None = None) -> str:
    """One raw record, exactly as the tenant sent it."""
    product = parse_record(raw)
    database, _ = _process_resources()
    async with database.session() as session:
        product_id = await _ingest(
            session,
            uuid.UUID(tenant_id),
            product,
            message_id=self.request.id,
            fingerprint=delivery_fingerprint(self),
        )
    await _queue_enrichment(product_id, tenant_id)
    return str(product_id)


def _prompt(product: Any, skus: list[str]) -> list[dict[str, str]]:
    facts: dict[str, Any] = {
        "title": product.title,
        "brand": product.brand,
        "category": product.category,
        "skus": skus,
    }
    return [
        {"role": "system", "content": _SYSTEM_PROMPT},
        {"role": "user", "content": json.dumps(facts)},
    ]


def _upsert_enrichment(dialect: str) -> Any:
    """The enrichment upsert, built once per dialect (Core, bind parameters): building it
    per call (``excluded`` makes a column proxy per column) and running it through the
    ORM's insert path were a sixth of the enrich task's samples under load."""
    built = _UPSERTS.get(dialect)
    if built is None:
        insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
        table: Table = Enrichment.__table__  # type: ignore[assignment]
        statement = insert(table).values({c: bindparam(c) for c in _ENRICHMENT_COLUMNS})
        built = _UPSERTS[dialect] = statement.on_conflict_do_update(
            index_elements=[table.c.product_id],
            set_={k: statement.excluded[k] for k in ("description", "tags", "model")},
        )
    return built


_ENRICHMENT_COLUMNS = ("product_id", "tenant_id", "description", "tags", "model")
_UPSERTS: dict[str, Any] = {}


@transactional
async def _write_enrichment(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    product_id: uuid.UUID,
    answer: _EnrichmentAnswer,
    *,
    model: str,
    message_id: str,
    fingerprint: str,
) -> None:
    connection = await session.connection()  # the session's transaction, without the ORM
    if not await claim_message(
        connection, message_id, task=ENRICH_TASK, tenant_id=tenant_id, fingerprint=fingerprint
    ):
        return
    values = {
        "product_id": product_id,
        "tenant_id": tenant_id,
        "description": answer.description,
        "tags": answer.tags,
        "model": model,
    }
    await connection.execute(_upsert_enrichment(connection.dialect.name), values)


_READ_PRODUCT = select(Product.title, Product.brand, Product.category).where(
    Product.id == bindparam("id"), Product.tenant_id == bindparam("tenant")
)
_READ_SKUS = select(Variant.sku).where(Variant.product_id == bindparam("id"))


@resilient_task(name=ENRICH_TASK, queue=REALTIME_QUEUE, inbox=_inbox)
async def enrich_product(self: Task, product_id: str, tenant_id: str) -> None:
    """Ask the LLM about one product and store its answer."""
    tenant, pid = uuid.UUID(tenant_id), uuid.UUID(product_id)
    database, llm = _process_resources()
    # Two Core reads in autocommit (no BEGIN/ROLLBACK, no ORM objects): what the prompt uses.
    async with database.reader.connect() as connection:
        product = (await connection.execute(_READ_PRODUCT, {"id": pid, "tenant": tenant})).first()
        if product is None:
            raise NotFoundError(f"unknown product {product_id}", field="product_id")
        skus = list((await connection.execute(_READ_SKUS, {"id": pid})).scalars())
    completion = await llm.complete(_prompt(product, skus), temperature=0.2)
    try:
        answer = _EnrichmentAnswer.model_validate_json(completion.text)
    except ValidationError as exc:  # the provider's fault, not the message's: retry
        raise LLMMalformedResponseError(f"the enrichment answer is unusable: {exc}") from exc
    async with database.session() as session:
        await _write_enrichment(
            session,
            tenant,
            pid,
            answer,
            model=completion.model,
            message_id=self.request.id,
            fingerprint=delivery_fingerprint(self),
        )


app = celery_app  # ``celery -A aura.worker.tasks worker`` finds the app here
