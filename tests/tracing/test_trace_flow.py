"""One trace from the gateway to the LLM: a product posted through the gateway (in this
process, its spans in memory) is published, run by a real worker process (its spans sent
by the real OTLP/HTTP exporter to a receiver here) and enriched by the LLM simulator.
A transient failure's retry stays in the trace; no secret and no prompt text is in it."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from celery import Celery
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from aura import tracing
from aura.config import Settings
from aura.db import Database
from aura.gateway import Gateway, create_app, create_tenant_with_key
from aura.gateway.senders import AmqpSender
from aura.llm import Faults, LLMSimulator
from aura.worker.celery_app import make_celery_app
from tests.helpers import running_celery_worker, wait_until
from tests.tracing.receiver import OtlpReceiver, Span, from_sdk

pytestmark = pytest.mark.timeout(90)

LLM_KEY = f"sk-trace-{uuid.uuid4().hex}"
ENRICH = "aura.enrich_product"


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def simulator() -> Iterator[LLMSimulator]:
    with LLMSimulator(Faults(api_key=LLM_KEY, retry_after=None), seed=7).running_in_thread() as sim:
        yield sim


@pytest.fixture(scope="module")
def traced_worker(
    amqp_url: str,
    redis_url: str,
    simulator: LLMSimulator,
    receiver: OtlpReceiver,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[subprocess.Popen[bytes]]:
    from tests.services import pg_test_url

    log = tmp_path_factory.mktemp("traced") / "worker.log"
    kept = ("CELERY_", "REDIS_", "LLM_", "DATABASE_", "OTEL_")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(kept)},
        "CELERY_BROKER_URL": amqp_url,
        "REDIS_URL": redis_url,
        "DATABASE_URL": pg_test_url(),
        "LLM_BASE_URL": simulator.base_url,
        "LLM_API_KEY": LLM_KEY,
        "LLM_CALL_DEADLINE": "5",
        "DB_POOL_SIZE": "2",
        "LOG_LEVEL": "WARNING",
        # the real exporter, configured as an operator would, batching for 50 ms only
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    with running_celery_worker(
        "aura.worker.tasks", env, log, pool="async", concurrency=4
    ) as process:
        yield process


@pytest.fixture
def memory() -> Iterator[InMemorySpanExporter]:
    """The gateway's spans (this process), in memory: ``aura.tracing``'s test switch."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "test-gateway"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install_provider(provider)
    yield exporter
    tracing.install_provider(None)
    provider.shutdown()


@pytest.fixture(scope="module")
def publisher(amqp_url: str) -> Celery:
    return make_celery_app(Settings(celery_broker_url=amqp_url))


@pytest.fixture
async def gateway(
    pg_database: Database,
    publisher: Celery,
    memory: InMemorySpanExporter,
    traced_worker: subprocess.Popen[bytes],
) -> AsyncIterator[tuple[httpx.AsyncClient, uuid.UUID, str]]:
    """A client of a gateway built after tracing was switched on, a tenant and its key."""
    built = Gateway(pg_database, publisher, {}, sender=AmqpSender(publisher))
    async with pg_database.session() as session:
        tenant, key = await create_tenant_with_key(session, f"trace-{uuid.uuid4().hex[:8]}")
        await session.commit()
    transport = httpx.ASGITransport(app=create_app(built))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        yield client, tenant.id, key
    await built.outbox.aclose()


async def post_product(client: httpx.AsyncClient, tenant: uuid.UUID, key: str, title: str) -> str:
    answer = await client.post(
        f"/v1/tenants/{tenant}/products",
        json={"title": title, "variants": [{"sku": f"T-{uuid.uuid4().hex[:8]}", "price": "9"}]},
        headers={"X-API-Key": key},
    )
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def gateway_spans(memory: InMemorySpanExporter) -> list[Span]:
    return [from_sdk(span) for span in memory.get_finished_spans()]


def one(spans: list[Span], name: str, **attributes: object) -> Span:
    found = [
        s
        for s in spans
        if s.name == name and all(s.attributes.get(k) == v for k, v in attributes.items())
    ]
    assert len(found) == 1, (name, attributes, [(s.name, s.attributes) for s in spans])
    return found[0]


async def settled_runs(
    receiver: OtlpReceiver, message_id: str, fate: str, within: float = 30
) -> list[Span]:
    """The worker's run spans of ``message_id``, once one with ``fate`` arrived."""

    def runs() -> list[Span]:
        return receiver.matching(
            lambda s: (
                s.name == f"run/{ENRICH}" and s.attributes.get("messaging.message.id") == message_id
            )
        )

    async def arrived() -> bool:
        return any(s.attributes.get("aura.fate") == fate for s in runs())

    await wait_until(arrived, within=within, interval=0.05)
    return runs()


def descendants(spans: list[Span], root: Span) -> list[Span]:
    found, frontier = [], {root.span_id}
    while frontier:
        children = [s for s in spans if s.parent_id in frontier]
        found += children
        frontier = {s.span_id for s in children}
    return found


async def test_one_trace_from_the_request_to_the_llm(
    gateway: tuple[httpx.AsyncClient, uuid.UUID, str],
    memory: InMemorySpanExporter,
    receiver: OtlpReceiver,
) -> None:
    client, tenant, key = gateway
    product = await post_product(client, tenant, key, "Trail shoe")
    message_id = f"enrich-{product}"
    runs = await settled_runs(receiver, message_id, "success")

    mine = gateway_spans(memory)
    request = one(mine, "POST /v1/tenants/{tenant_id}/products")
    assert request.kind == "SERVER"
    trace = request.trace_id
    publish = one(mine, "publish realtime_queue", **{"messaging.message.id": message_id})
    assert (publish.kind, publish.trace_id, publish.parent_id) == (
        "PRODUCER",
        trace,
        request.span_id,
    )
    staged = [s for s in mine if s.parent_id == request.span_id and s.kind == "CLIENT"]
    assert any(s.attributes.get("db.system") == "postgresql" for s in staged)  # the write

    run = one(runs, f"run/{ENRICH}")
    assert (run.kind, run.trace_id, run.parent_id) == ("CONSUMER", trace, publish.span_id)
    assert run.service == "aura-worker"
    assert run.attributes["aura.fate"] == "success"
    assert run.attributes["aura.retries"] == 0
    assert run.attributes["aura.tenant_id"] == str(tenant)

    async def llm_span_arrived() -> bool:
        return any(s.name.startswith("chat ") for s in descendants(receiver.spans, run))

    await wait_until(llm_span_arrived, within=10, interval=0.05)
    below = descendants(receiver.matching(lambda s: s.trace_id == trace), run)
    statements = [s for s in below if s.attributes.get("db.system") == "postgresql"]
    assert len(statements) >= 2, [s.name for s in below]  # the read for the prompt, the write
    chat = next(s for s in below if s.name.startswith("chat "))
    assert (chat.kind, chat.parent_id, chat.error) == ("CLIENT", run.span_id, False)
    model = chat.attributes["gen_ai.request.model"]
    assert chat.name == f"chat {model}"
    assert chat.attributes["gen_ai.operation.name"] == "chat"
    assert chat.attributes["gen_ai.provider.name"] == "openai"
    assert chat.attributes["gen_ai.response.model"]
    assert chat.attributes["gen_ai.response.id"]
    assert chat.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert chat.attributes["gen_ai.usage.input_tokens"] > 0
    assert chat.attributes["gen_ai.usage.output_tokens"] > 0
    # in order: the request, its publish, the delivery, its statements and its LLM call
    assert request.start <= publish.start <= run.start <= chat.start
    assert all(run.start <= s.start for s in statements)


async def test_a_retry_stays_in_the_trace(
    gateway: tuple[httpx.AsyncClient, uuid.UUID, str],
    memory: InMemorySpanExporter,
    receiver: OtlpReceiver,
    simulator: LLMSimulator,
) -> None:
    client, tenant, key = gateway
    simulator.faults.update({"error_rate": 1.0, "error_statuses": [503]})
    try:
        product = await post_product(client, tenant, key, "Rain jacket")
        message_id = f"enrich-{product}"
        await settled_runs(receiver, message_id, "retry")
    finally:
        simulator.faults.update({"error_rate": 0.0})
    runs = await settled_runs(receiver, message_id, "success")

    request = one(gateway_spans(memory), "POST /v1/tenants/{tenant_id}/products")
    assert {s.trace_id for s in runs} == {request.trace_id}
    failed = [s for s in runs if s.attributes["aura.fate"] == "retry"]
    done = one(runs, f"run/{ENRICH}", **{"aura.fate": "success"})
    assert failed[0].attributes["aura.retries"] == 0
    assert failed[0].attributes["aura.fate.reason"]  # the error's type
    assert done.attributes["aura.retries"] == len(failed) >= 1
    # the retry was published by the failed run (Celery's instrumentation: apply_async)
    republish = receiver.matching(lambda s: s.span_id == done.parent_id)
    assert [(s.name, s.kind) for s in republish] == [(f"apply_async/{ENRICH}", "PRODUCER")]
    assert republish[0].parent_id in {s.span_id for s in failed}
    failed_calls = [s for s in receiver.spans if s.parent_id == failed[0].span_id]
    chat = next(s for s in failed_calls if s.name.startswith("chat "))
    assert chat.error
    assert chat.attributes["error.type"]


async def test_no_secret_and_no_prompt_in_any_span(
    gateway: tuple[httpx.AsyncClient, uuid.UUID, str],
    memory: InMemorySpanExporter,
    receiver: OtlpReceiver,
) -> None:
    client, tenant, key = gateway
    marker = f"Zebracorn{uuid.uuid4().hex[:6]}"  # in the title, and so in the prompt
    product = await post_product(client, tenant, key, marker)
    runs = await settled_runs(receiver, f"enrich-{product}", "success")
    trace = runs[0].trace_id

    async def llm_span_arrived() -> bool:
        spans = receiver.matching(lambda s: s.trace_id == trace)
        return any(s.name.startswith("chat ") for s in spans)

    await wait_until(llm_span_arrived, within=10, interval=0.05)
    spans = gateway_spans(memory) + receiver.matching(lambda s: s.trace_id == trace)
    assert len(spans) >= 6
    text = repr([(s.name, s.attributes) for s in spans])
    for secret in (LLM_KEY, key, marker, "Bearer", "X-API-Key", "x-api-key"):
        assert secret not in text, secret
