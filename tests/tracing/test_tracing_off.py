"""Tracing is off unless the environment configures an exporter, and off it costs nothing:
no SDK imported, no span made on the hot paths. On, log lines carry the trace's ids, and
prompt text is recorded only when asked for."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from aura import tracing
from aura.llm import Faults, LLMSimulator, ResilientLLMClient

_OFF = """
import asyncio, json, os, sys, uuid
for name in [n for n in os.environ if n.startswith("OTEL_")]:
    del os.environ[name]
from aura import tracing
from aura.db import Staged
from aura.gateway.app import create_app
from aura.gateway.senders import CelerySender
from aura.llm import LLMSimulator, ResilientLLMClient
import aura.worker.tasks
import opentelemetry.trace as api

made = []  # every span the API makes without an SDK is a NonRecordingSpan
_init = api.NonRecordingSpan.__init__
def counted(self, *args, **kwargs):
    made.append(1)
    _init(self, *args, **kwargs)
api.NonRecordingSpan.__init__ = counted

assert tracing.configure_tracing("off-test", celery=True) is False
assert not tracing.enabled()
staged = Staged("m-1", uuid.uuid4(), "aura.enrich_product", "realtime_queue", ["a"])
assert staged.traceparent is None
create_app()

class Publisher:
    headers = []
    def send_task(self, *args, headers, **kwargs):
        self.headers.append(headers)

publisher = Publisher()
sent = asyncio.run(CelerySender(publisher).send([staged]))
assert sent == (["m-1"], None), sent
assert list(publisher.headers[0]) == ["aura_tenant"], publisher.headers

async def call():
    async with LLMSimulator() as sim:
        async with ResilientLLMClient.from_settings(base_url=sim.base_url) as llm:
            return await llm.complete([{"role": "user", "content": "hi"}])

assert asyncio.run(call()).text
assert made == [], "a span was made with tracing off"
# Ours only: redis-py (8.x) imports the SDK's metrics (and with them its resources) by
# itself wherever the SDK is installed.
loaded = sorted(
    name for name in sys.modules
    if name.startswith(("opentelemetry.sdk.trace", "opentelemetry.exporter",
                        "opentelemetry.instrumentation", "opentelemetry.proto"))
)
print(json.dumps(loaded))
"""


def test_off_imports_no_sdk_and_takes_no_span() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _OFF], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


_WITHOUT_SDK = """
import importlib.abc, json, sys
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith(("opentelemetry.sdk", "opentelemetry.exporter")):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NotInstalled())
from aura import tracing
on = tracing.configure_tracing("aura-worker", celery=True, environ={"OTEL_TRACES_EXPORTER": "otlp"})
print(json.dumps([on, tracing.enabled()]))
"""


def test_asked_for_without_the_extra_it_stays_off_and_says_why() -> None:
    """OTEL_* is often set for every process on a node: a worker without the tracing extra
    runs on, untraced, with one warning naming the extra."""
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_SDK],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [False, False]
    assert "aura-platform[tracing]" in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("environ", "wanted"),
    [
        ({}, ()),
        ({"OTEL_TRACES_EXPORTER": "none"}, ()),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ()),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ("otlp",)),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ("otlp",)),
        ({"OTEL_TRACES_EXPORTER": "console"}, ("console",)),
        ({"OTEL_TRACES_EXPORTER": "otlp, console"}, ("console", "otlp")),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, ()),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, ()),
    ],
)
def test_the_environment_decides(environ: dict[str, str], wanted: tuple[str, ...]) -> None:
    assert tracing.tracing_wanted(environ) == wanted


_LOGS = """
import io, json, sys
import structlog
from opentelemetry.sdk.trace import TracerProvider
from aura import tracing
from aura.logs import configure_logging

stream = io.StringIO()
configure_logging("INFO", "json", stream=stream)
log = structlog.get_logger("t")
log.info("before")  # a cached logger: the processor reaches it too
tracing.install_provider(TracerProvider())
provider = tracing.tracer_provider()
with provider.get_tracer("t").start_as_current_span("s") as span:
    log.info("inside")
log.info("outside")
lines = [json.loads(line) for line in stream.getvalue().splitlines()]
context = span.get_span_context()
print(json.dumps([lines, f"{context.trace_id:032x}", f"{context.span_id:016x}"]))
"""


def test_log_lines_carry_the_current_span() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _LOGS], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines, trace_id, span_id = json.loads(done.stdout.strip().splitlines()[-1])
    by_event = {line["event"]: line for line in lines}
    assert "trace_id" not in by_event["before"]
    assert (by_event["inside"]["trace_id"], by_event["inside"]["span_id"]) == (trace_id, span_id)
    assert "trace_id" not in by_event["outside"]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install_provider(provider, capture_content=True)
    yield exporter
    tracing.install_provider(None)


async def test_prompt_text_only_when_asked_and_a_refusal_is_an_error(
    spans: InMemorySpanExporter,
) -> None:
    key = "sk-capture-test-0123456789"
    async with LLMSimulator(Faults(api_key=key)) as sim:
        llm = ResilientLLMClient.from_settings(base_url=sim.base_url, api_key=key, fail_max=1)
        async with llm:
            await llm.complete([{"role": "user", "content": "Zebracorn"}])
            sim.faults.update({"error_rate": 1.0, "error_statuses": [503]})
            with pytest.raises(Exception):  # noqa: B017, PT011 - the provider's 503
                await llm.complete([{"role": "user", "content": "again"}])
            with pytest.raises(Exception, match="circuit"):  # the breaker refuses
                await llm.complete([{"role": "user", "content": "refused"}])
    answered, failed, refused = spans.get_finished_spans()
    attributes = dict(answered.attributes or {})
    assert "Zebracorn" in str(attributes["gen_ai.input.messages"])
    assert "gen_ai.output.messages" in attributes
    assert key not in repr([dict(s.attributes or {}) for s in spans.get_finished_spans()])
    assert dict(failed.attributes or {})["error.type"] == "LLMHTTPStatusError"
    assert dict(refused.attributes or {})["error.type"] == "CircuitOpenError"
    assert refused.status.status_code.name == "ERROR"
