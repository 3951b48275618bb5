"""Gateway -> RabbitMQ -> a real worker process -> PostgreSQL, with the LLM simulator
misbehaving: every accepted record is enriched once or is in the DLQ, nothing else."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator

import httpx
import pytest
from kombu.connection import Connection
from sqlalchemy import func, select

from aura.catalog import Enrichment, ImportRecord, Product, create_import
from aura.config import Settings
from aura.db import Database, ProcessedMessage
from aura.gateway import Gateway, create_app, create_tenant_with_key
from aura.gateway.senders import AmqpSender
from aura.llm import Faults, LLMSimulator
from aura.messaging import DeadLetterQueue
from aura.worker.celery_app import make_celery_app
from tests.helpers import forget_held_rows, running_celery_worker, wait_until

pytestmark = pytest.mark.timeout(180)
METRICS_PORT = 19187


@pytest.fixture(scope="module")
def simulator() -> Iterator[LLMSimulator]:
    faults = Faults(error_rate=0.2, error_statuses=(500, 503), retry_after=1, latency=0.01)
    with LLMSimulator(faults, seed=42).running_in_thread() as sim:
        yield sim


@pytest.fixture(scope="module")
def platform_worker(
    amqp_url: str, redis_url: str, simulator: LLMSimulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[subprocess.Popen[bytes]]:
    from tests.services import pg_test_url

    log = tmp_path_factory.mktemp("platform") / "worker.log"
    metrics_dir = tmp_path_factory.mktemp("platform-metrics")
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CELERY_", "REDIS_", "LLM_", "DATABASE_"))
        },
        "CELERY_BROKER_URL": amqp_url,
        "REDIS_URL": redis_url,
        "DATABASE_URL": pg_test_url(),
        "LLM_BASE_URL": simulator.base_url,
        "DB_POOL_SIZE": "4",
        "DB_MAX_OVERFLOW": "2",
        "CIRCUIT_BREAKER_RESET_TIMEOUT": "2",  # scaled: the seed's 60 s would idle the test
        # The simulator is a thread of this test process: where earlier tests left work on
        # its event loop, a few calls went unanswered until the 30 s call deadline.
        "LLM_CALL_DEADLINE": "5",
        "LLM_READ_TIMEOUT": "3",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "WORKER_METRICS_PORT": str(METRICS_PORT),
        "WORKER_QUEUE_POLL_INTERVAL": "0.5",
        "LOG_LEVEL": "WARNING",
    }
    with running_celery_worker(
        "aura.worker.tasks", env, log, pool="async", concurrency=20
    ) as process:
        yield process


async def count(database: Database, statement: object) -> int:
    async with database.session() as session:
        return int(await session.scalar(statement) or 0)  # type: ignore[call-overload]


async def test_every_record_is_enriched_once_or_dead_lettered(
    pg_database: Database,
    amqp_url: str,
    platform_worker: subprocess.Popen[bytes],
    simulator: LLMSimulator,
) -> None:
    await forget_held_rows(pg_database)  # earlier tests' imports are not this test's
    publisher = make_celery_app(Settings(celery_broker_url=amqp_url))
    # The sender `aura gateway` uses: aio-pika on the event loop, so what the worker's
    # envelope guard takes here is what the gateway publishes in production.
    gateway = Gateway(pg_database, publisher, {}, sender=AmqpSender(publisher))
    app = create_app(gateway)
    async with pg_database.session() as session:
        tenant, key = await create_tenant_with_key(session, f"e2e-{uuid.uuid4().hex[:8]}")
        await session.commit()
    headers = {"X-API-Key": key}
    good = [
        json.dumps(
            {
                "title": f"Shoe {i}",
                "category": "running",
                "variants": [{"sku": f"E-{i}", "price": "10.00"}],
            }
        )
        for i in range(40)
    ]
    malformed = [
        '{"title": "half',
        '{"variants": []}',
        "\\xff not json",
        '{"title": "T", "variants": [{"sku": "E-0", "price": 1}]}',
    ]
    body = "\n".join(good[:20] + malformed[:2] + good[20:] + malformed[2:])

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gw"
    ) as client:
        direct = await client.post(
            f"/v1/tenants/{tenant.id}/products",
            json={"title": "Direct", "variants": [{"sku": "DIRECT-1", "price": "5"}]},
            headers=headers,
        )
        assert direct.status_code == 201
        accepted = await client.post(
            f"/v1/tenants/{tenant.id}/imports",
            content=body.encode(),
            headers={**headers, "content-type": "application/x-ndjson"},
        )
        assert accepted.status_code == 202
        import_id = accepted.json()["import_id"]
        assert accepted.json()["accepted"] == 44

        async def settled() -> bool:
            counts = (
                await client.get(f"/v1/tenants/{tenant.id}/imports/{import_id}", headers=headers)
            ).json()
            enriched = await count(
                pg_database,
                select(func.count())
                .select_from(Enrichment)
                .where(Enrichment.tenant_id == tenant.id),
            )
            # An enrichment whose every try met a simulated 5xx is dead-lettered: a fate.
            return (
                counts["pending"] == 0
                and enriched + _enrich_letters(amqp_url, str(tenant.id)) == counts["done"] + 1
            )

        await wait_until(settled, within=150, interval=0.5)
        counts = (
            await client.get(f"/v1/tenants/{tenant.id}/imports/{import_id}", headers=headers)
        ).json()
    await gateway.outbox.aclose()

    # Accounting: accepted = committed once + dead-lettered; nothing lost, nothing doubled.
    assert counts["done"] == 40
    assert counts["dead_lettered"] == 4
    products = await count(
        pg_database, select(func.count()).select_from(Product).where(Product.tenant_id == tenant.id)
    )
    assert products == 41  # 40 imported + 1 posted directly
    enrichments = await count(
        pg_database,
        select(func.count()).select_from(Enrichment).where(Enrichment.tenant_id == tenant.id),
    )
    enrich_letters = _enrich_letters(amqp_url, str(tenant.id))
    # Each product enriched exactly once (the key is the product), or its enrichment in the
    # DLQ after the retry budget (each try had a 20 % chance of a simulated 5xx).
    assert enrichments + enrich_letters == 41
    assert enrich_letters <= 2
    ingested = await count(
        pg_database,
        select(func.count())
        .select_from(ProcessedMessage)
        .where(
            ProcessedMessage.tenant_id == tenant.id, ProcessedMessage.task == "aura.ingest_product"
        ),
    )
    assert ingested == 40
    dead_ids = set(
        await _scalars(
            pg_database,
            select(ImportRecord.message_id).where(
                ImportRecord.import_id == uuid.UUID(import_id),
                ImportRecord.status == "dead_lettered",
            ),
        )
    )
    with Connection(amqp_url) as connection:
        letters = [
            letter
            for letter in DeadLetterQueue(connection).list(limit=1000)
            if letter.message_id in dead_ids
        ]
    assert {letter.message_id for letter in letters} == dead_ids
    assert {letter.tenant_id for letter in letters} == {str(tenant.id)}  # passed by position
    assert {letter.reason.value for letter in letters} == {"poison_pill"}
    assert any("SKU already used" in letter.error for letter in letters)
    assert simulator.outcomes().get("ok", 0) >= enrichments

    # The worker's /metrics sums its prefork children (multiprocess mode).
    async with httpx.AsyncClient() as scraper:
        exposition = (await scraper.get(f"http://127.0.0.1:{METRICS_PORT}/metrics")).text
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in exposition.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['messages_sent_to_dlq_total{reason="poison_pill"}'] >= 4
    assert 'celery_tasks_pending{queue="bulk_queue"}' in samples
    assert 'celery_tasks_pending{queue="realtime_queue"}' in samples
    assert sum(v for k, v in simulator.outcomes().items() if k != "ok") > 0  # faults happened


def _enrich_letters(amqp_url: str, tenant_id: str) -> int:
    """Enrichments of ``tenant_id`` in the DLQ (each max_retries_exceeded, or a failure)."""
    with Connection(amqp_url) as connection:
        letters = DeadLetterQueue(connection).list(limit=10_000, tenant=tenant_id)
    enrich = [letter for letter in letters if letter.task == "aura.enrich_product"]
    assert all(letter.reason.value == "max_retries_exceeded" for letter in enrich), enrich
    return len(enrich)


async def _scalars(database: Database, statement: object) -> list[str]:
    async with database.session() as session:
        return list((await session.scalars(statement)).all())  # type: ignore[call-overload]


async def _scrape() -> dict[str, float]:
    async with httpx.AsyncClient() as scraper:
        exposition = (await scraper.get(f"http://127.0.0.1:{METRICS_PORT}/metrics")).text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in exposition.splitlines()
        if line and not line.startswith("#")
    }


async def test_duplicate_deliveries_of_a_committed_enrichment_make_no_llm_call(
    pg_database: Database,
    amqp_url: str,
    platform_worker: subprocess.Popen[bytes],
    simulator: LLMSimulator,
) -> None:
    from aura.contract import ENRICH_TASK, INGEST_TASK

    publisher = make_celery_app(Settings(celery_broker_url=amqp_url))
    async with pg_database.session() as session:
        tenant, _ = await create_tenant_with_key(session, f"dup-{uuid.uuid4().hex[:8]}")
        await session.commit()
    record = json.dumps({"title": "Dup", "variants": [{"sku": "DUP-1", "price": "3"}]})
    async with pg_database.session() as session:  # an import of one record, as the gateway
        batch, (ingest_id,) = await create_import(session, tenant.id, 1)
        await session.commit()
    ingest = {
        "args": [record, str(tenant.id)],
        "kwargs": {"import_id": str(batch.id)},
        "task_id": ingest_id,
        "queue": "bulk_queue",
    }
    publisher.send_task(INGEST_TASK, **ingest)

    async def enriched() -> bool:
        return (
            await count(
                pg_database,
                select(func.count())
                .select_from(Enrichment)
                .where(Enrichment.tenant_id == tenant.id),
            )
            == 1
        )

    await wait_until(enriched, within=60, interval=0.2)
    async with pg_database.session() as session:
        product_id = await session.scalar(select(Product.id).where(Product.tenant_id == tenant.id))
    key = 'aura_duplicate_deliveries_total{kind="committed"}'
    before_metric = (await _scrape()).get(key, 0.0)
    before_llm = simulator.requests

    for _ in range(200):  # the relay, a redelivery, a replay: the same message again
        publisher.send_task(
            ENRICH_TASK,
            args=[str(product_id), str(tenant.id)],
            task_id=f"enrich-{product_id}",
            queue="realtime_queue",
        )
    publisher.send_task(INGEST_TASK, **ingest)  # the ingest again: it requeues its enrichment

    async def all_acked() -> bool:
        return (await _scrape()).get(key, 0.0) >= before_metric + 202

    await wait_until(all_acked, within=120, interval=0.5)
    assert simulator.requests == before_llm  # no LLM request for a committed enrichment
    assert await enriched()
    products = await count(
        pg_database, select(func.count()).select_from(Product).where(Product.tenant_id == tenant.id)
    )
    assert products == 1
