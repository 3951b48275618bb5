"""The intelligence worker's tasks.

    aura.ingest_product   (bulk_queue)     one raw catalog record: parse, validate, write the
                                           product and its variants with the inbox, mark the
                                           import record done, then queue its enrichment
    aura.enrich_product   (realtime_queue) ask the LLM for a description and tags, write
                                           the enrichment with the inbox

Malformed records are poison pills (DLQ at once, import record marked dead_lettered); a
dropped database connection or an LLM failure is transient (retried); an open LLM
circuit, or its tenant's token budget spent (LLM_TENANT_BUDGETS), defers the task. Each
effect is committed once, whatever the redeliveries.

Each effect is one statement on PostgreSQL with its inbox claim (``aura.catalog.pipeline``).
The enrichment reads the inbox before it runs (``DatabaseInbox``): a delivery whose effect
is committed makes no LLM call and writes nothing. The ingest does not (its statement
claims the id and answers with the committed twin's product: a second read would be a
second round trip for that answer): a committed ingest writes nothing and only queues its
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
from sqlalchemy.ext.asyncio import AsyncSession

from aura.catalog import mark_record, parse_record
from aura.catalog.pipeline import PromptFacts, ingest_record, read_for_prompt, store_enrichment
from aura.config import get_settings
from aura.contract import BULK_QUEUE, ENRICH_TASK, INGEST_TASK, MAX_RECORD_BYTES, REALTIME_QUEUE
from aura.db import Database, DatabaseInbox, transactional
from aura.errors import LLMMalformedResponseError, NotFoundError
from aura.events import DeadLetterReason
from aura.llm import ResilientLLMClient
from aura.messaging import DeadLetter, delivery_fingerprint, report_duplicate, resilient_task
from aura.messaging.delivery import TENANT_HEADER
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


@transactional  # a connection lost on the way is counted and logged as every write's is
async def _mark_record_dead(session: AsyncSession, message_id: str) -> None:
    await mark_record(session, message_id, "dead_lettered")


async def _mark_dead(letter: DeadLetter) -> None:
    if letter.reason is DeadLetterReason.CONFLICTING_MESSAGE_ID:
        return  # the id's import record belongs to the payload committed under it
    database, _ = _process_resources()
    async with database.session() as session:
        await _mark_record_dead(session, letter.message_id)


async def _queue_enrichment(product_id: uuid.UUID | str, tenant_id: str) -> None:
    """Publish (confirmed) the product's enrichment, off the event loop: a blocking
    publish on it would stall every other task in flight (AsyncPool)."""
    await asyncio.to_thread(
        ingest_product.app.send_task,
        ENRICH_TASK,
        args=[str(product_id), tenant_id],
        task_id=f"enrich-{product_id}",
        queue=REALTIME_QUEUE,
        headers={TENANT_HEADER: tenant_id},  # the pool's fair share goes by it
    )


@resilient_task(
    name=INGEST_TASK,
    queue=BULK_QUEUE,
    on_dead_letter=_mark_dead,
    inbox=_inbox,
    lookup_first=False,  # its one statement claims the id and tells a committed twin
)
async def ingest_product(self: Task, raw: str, tenant_id: str, import_id: str | None = None) -> str:
    """One raw record, exactly as the tenant sent it."""
    product = parse_record(raw)
    database, _ = _process_resources()
    ingested = await ingest_record(
        database,
        uuid.UUID(tenant_id),
        product,
        message_id=self.request.id,
        task=INGEST_TASK,
        fingerprint=delivery_fingerprint(self),
    )
    if not ingested.created:  # committed before: queue its enrichment again, nothing else
        report_duplicate(self)  # (the publish after that commit may have been lost)
    await _queue_enrichment(ingested.product_id, tenant_id)
    return str(ingested.product_id)


def _replayable_record(args: list[Any], kwargs: dict[str, Any]) -> str | None:
    """What ``aura dlq replay`` checks of an ingest letter, as the gateway would have:
    the record's size and a tenant id that is one."""
    raw = args[0] if args else kwargs.get("raw")
    tenant = args[1] if len(args) > 1 else kwargs.get("tenant_id")
    if not isinstance(raw, str):
        return "its record is not text"
    size = len(raw.encode("utf-8", "surrogatepass"))
    if size > MAX_RECORD_BYTES:
        return f"oversized: its record is {size} bytes, the gateway takes {MAX_RECORD_BYTES}"
    try:
        uuid.UUID(str(tenant))
    except ValueError:
        return "its tenant id is not a tenant's"
    return None


ingest_product.aura_replay_check = _replayable_record


def _prompt(product: PromptFacts) -> list[dict[str, str]]:
    facts: dict[str, Any] = {
        "title": product.title,
        "brand": product.brand,
        "category": product.category,
        "skus": product.skus,
    }
    return [
        {"role": "system", "content": _SYSTEM_PROMPT},
        {"role": "user", "content": json.dumps(facts)},
    ]


@resilient_task(name=ENRICH_TASK, queue=REALTIME_QUEUE, inbox=_inbox)
async def enrich_product(self: Task, product_id: str, tenant_id: str) -> None:
    """Ask the LLM about one product and store its answer."""
    tenant, pid = uuid.UUID(tenant_id), uuid.UUID(product_id)
    database, llm = _process_resources()
    product = await read_for_prompt(database, tenant, pid)
    if product is None:
        raise NotFoundError(f"unknown product {product_id}", field="product_id")
    completion = await llm.complete(_prompt(product), temperature=0.2, tenant=tenant_id)
    try:
        answer = _EnrichmentAnswer.model_validate_json(completion.text)
    except ValidationError as exc:  # the provider's fault, not the message's: retry
        raise LLMMalformedResponseError(f"the enrichment answer is unusable: {exc}") from exc
    await store_enrichment(
        database,
        tenant,
        pid,
        description=answer.description,
        tags=answer.tags,
        model=completion.model,
        message_id=self.request.id,
        task=ENRICH_TASK,
        fingerprint=delivery_fingerprint(self),
    )


app = celery_app  # ``celery -A aura.worker.tasks worker`` finds the app here
