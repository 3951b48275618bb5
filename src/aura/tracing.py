"""OpenTelemetry tracing: off unless the environment configures an exporter.

On when ``OTEL_TRACES_EXPORTER`` names ``otlp`` or ``console``, or when it is unset and
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is; never when
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``. The SDK reads the rest itself
(``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_EXPORTER_OTLP_*``,
``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``). Each process calls ``configure_tracing`` once at
start: the gateway (its relay too), the worker (and each prefork child), ``aura outbox
relay``. One trace per accepted record::

    span                       kind      made by
    POST /v1/tenants/...       SERVER    FastAPI (native; reads ``traceparent``)
    publish {queue}            PRODUCER  aura.gateway.senders, per message, parented on the
                                         ``traceparent`` stored with its outbox row
    run/{task}                 CONSUMER  Celery's instrumentation (the message's header);
                                         ``aura.fate`` and the rest set by aura.messaging
    apply_async/{task}         PRODUCER  Celery's instrumentation: a retry, a follow-up
    {verb} {database}          CLIENT    SQLAlchemy's instrumentation (each Database's
                                         engine) and aura.db._statement (raw asyncpg)
    chat {model}               CLIENT    aura.llm.client, GenAI attributes; a breaker's
                                         refusal is an error span

What tracing must not cost when off: nothing here imports the SDK (or the API) until
tracing is on, and every helper returns at its first line (``enabled()``: one global
read); hot paths test it before building anything. What it must not leak: no prompt or
completion text unless ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``
(redacted then, as logs are), no API key, no request headers, no database password
(SQLAlchemy's instrumentation records the user and host, never the URL).

``install_provider`` is the tests' switch: their own provider (an in-memory exporter),
without touching the process-wide one; ``install_provider(None)`` turns tracing off again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import structlog

from aura.logs import add_processor, redact_text

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider
    from sqlalchemy.ext.asyncio import AsyncEngine
    from structlog.typing import EventDict, WrappedLogger

__all__ = [
    "CAPTURE_CONTENT_ENV",
    "LLMCall",
    "configure_tracing",
    "current_traceparent",
    "db_span",
    "delivery_attributes",
    "enabled",
    "install_provider",
    "instrument_engine",
    "llm_span",
    "publish_span",
    "tracer_provider",
    "tracing_wanted",
]

CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
_SCOPE = "aura"
# GenAI semantic conventions (the package's own constants are marked deprecated)
GEN_AI_OPERATION = "gen_ai.operation.name"
GEN_AI_PROVIDER = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"
ERROR_TYPE = "error.type"

_tracer: Tracer | None = None
_provider: TracerProvider | None = None
_capture_content = False
_configured_pid: int | None = None
_lock = threading.Lock()
_log = structlog.get_logger("aura.tracing")


def enabled() -> bool:
    """Whether this process traces (``configure_tracing`` or ``install_provider`` ran)."""
    return _tracer is not None


def tracer_provider() -> TracerProvider | None:
    """The provider Aura's spans go to (None when tracing is off)."""
    return _provider


def tracing_wanted(environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The exporters the environment asks for (``otlp``, ``console``); () is off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ()
    named = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if named:
        chosen = {part.strip() for part in named.split(",")} & {"otlp", "console"}
        return tuple(sorted(chosen))
    if environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    ):
        return ("otlp",)
    return ()


def configure_tracing(
    service_name: str, *, celery: bool = False, environ: Mapping[str, str] = os.environ
) -> bool:
    """Turn tracing on in this process if the environment asks for it (see the module
    doc); returns whether it is on. ``service_name`` is the default for ``service.name``
    (``OTEL_SERVICE_NAME`` wins). ``celery``: also trace Celery's task runs and publishes
    (the worker). Once per process: later calls (a prefork child's) return at once."""
    global _configured_pid
    with _lock:
        if _configured_pid is not None or _tracer is not None:
            return enabled()
        _configured_pid = os.getpid()
        exporters = tracing_wanted(environ)
        if not exporters:
            return False
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
        except ImportError as exc:  # OTEL_* is often set node-wide, for every process on it:
            _log.warning(  # a worker without the extra runs on, untraced, and says why
                "OTEL_* asks for traces, but the tracing extra is not installed: tracing "
                "stays off (pip install 'aura-platform[tracing]')",
                missing=getattr(exc, "name", None) or str(exc),
            )
            return False

        named = environ.get("OTEL_SERVICE_NAME") or "service.name=" in environ.get(
            "OTEL_RESOURCE_ATTRIBUTES", ""
        )
        provider = TracerProvider(
            resource=Resource.create({} if named else {"service.name": service_name})
        )
        for exporter in exporters:
            if exporter == "otlp":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )

                provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            else:
                provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        trace.set_tracer_provider(provider)
        # Celery's exchange objects as attribute values: one warning per retry, harmless
        logging.getLogger("opentelemetry.attributes").setLevel(logging.ERROR)
        _use(provider, capture=environ.get(CAPTURE_CONTENT_ENV, "").lower() == "true")
        if celery:
            from opentelemetry.instrumentation.celery import CeleryInstrumentor

            CeleryInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
    _log.info("tracing on", exporters=",".join(exporters), service=service_name)
    return True


def install_provider(provider: TracerProvider | None, *, capture_content: bool = False) -> None:
    """Trace Aura's spans into ``provider`` (a test's own), or turn tracing off (None).
    The process-wide provider is left as it is: FastAPI is given this one by
    ``create_app``; Celery's instrumentation is ``configure_tracing``'s only."""
    global _tracer, _provider, _capture_content
    if provider is None:
        _tracer, _provider, _capture_content = None, None, False
        return
    _use(provider, capture=capture_content)


def _use(provider: TracerProvider, *, capture: bool) -> None:
    global _tracer, _provider, _capture_content
    from aura import __version__

    _provider, _capture_content = provider, capture
    _tracer = provider.get_tracer(_SCOPE, __version__)
    add_processor(_trace_ids)


def _trace_ids(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """The current span's trace and span ids on a log line (none when no span is)."""
    if _tracer is None:
        return event_dict
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict["trace_id"] = format(context.trace_id, "032x")
        event_dict["span_id"] = format(context.span_id, "016x")
    return event_dict


# -- context across the outbox and the broker ----------------------------------------------


def current_traceparent() -> str | None:
    """The current span's W3C ``traceparent`` (stored with an outbox row when it is
    staged); None when tracing is off or no span is current."""
    if _tracer is None:
        return None
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent")


@contextlib.contextmanager
def publish_span(
    task: str, message_id: str, queue: str, traceparent: str | None, tenant: object = None
) -> Iterator[dict[str, str]]:
    """A PRODUCER span for one message, child of ``traceparent`` (the staging request's):
    yields the headers that carry it to the worker (``{}`` when tracing is off)."""
    if _tracer is None:
        yield {}
        return
    from opentelemetry import propagate, trace

    parent = propagate.extract({"traceparent": traceparent}) if traceparent else None
    attributes = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.destination.name": queue,
        "messaging.message.id": message_id,
        "celery.task_name": task,
    }
    if tenant is not None:
        attributes["aura.tenant_id"] = str(tenant)
    with _tracer.start_as_current_span(
        f"publish {queue}", context=parent, kind=trace.SpanKind.PRODUCER, attributes=attributes
    ):
        headers: dict[str, str] = {}
        propagate.inject(headers)
        yield headers


def delivery_attributes(
    outcome: str, reason: str, request: Any, tenant: str | None, error: BaseException | None
) -> None:
    """Set a delivery's fate on the current span (the run span Celery's instrumentation
    made): ``aura.fate`` (success, retry, deferred, dead_lettered, duplicate, requeued,
    failed), ``aura.fate.reason`` (the dead letter's reason, else the type of the error
    that was retried or put off), ``aura.retries`` (Celery's count of this message's
    retries and deferrals), ``aura.redelivered``, the message id and the tenant."""
    if _tracer is None:
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    if not span.is_recording():
        return
    if not reason and error is not None:  # Celery's Retry keeps the error it retries
        reason = type(getattr(error, "exc", None) or error).__name__
    span.set_attribute("aura.fate", str(outcome))
    if reason:
        span.set_attribute("aura.fate.reason", reason)
    span.set_attribute("aura.retries", int(getattr(request, "retries", 0) or 0))
    delivery_info = getattr(request, "delivery_info", None) or {}
    span.set_attribute("aura.redelivered", bool(delivery_info.get("redelivered")))
    message_id = getattr(request, "id", None)
    if message_id:
        span.set_attribute("messaging.message.id", str(message_id))
    if tenant:
        span.set_attribute("aura.tenant_id", tenant)


# -- the database -------------------------------------------------------------------------


def instrument_engine(engine: AsyncEngine) -> None:
    """SQLAlchemy's instrumentation on ``engine`` (a span per statement), if tracing is on.
    Statements are recorded with their placeholders, never their values."""
    if _tracer is None:
        return
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    # skip_dep_check: the instrumentation pins SQLAlchemy < 2.1 but works with it
    SQLAlchemyInstrumentor().instrument(
        engine=engine.sync_engine,
        tracer_provider=_provider,
        enable_commenter=False,
        skip_dep_check=True,
    )


@contextlib.contextmanager
def db_span(function: str, statement: str, database: str | None) -> Iterator[None]:
    """A CLIENT span for one statement sent on the raw driver connection (bypassing
    SQLAlchemy's events): named as SQLAlchemy's instrumentation names its spans."""
    if _tracer is None:
        yield
        return
    from opentelemetry import trace

    verb = statement.split(None, 1)[0].upper() if statement.strip() else "SQL"
    attributes = {
        "db.system": "postgresql",
        "db.statement": statement,
        "aura.db.function": function,
    }
    if database:
        attributes["db.name"] = database
    name = f"{verb} {database}" if database else verb
    with _tracer.start_as_current_span(name, kind=trace.SpanKind.CLIENT, attributes=attributes):
        yield


# -- LLM calls ------------------------------------------------------------------------------


class LLMCall:
    """The span of one LLM call, for the client to report the answer on."""

    __slots__ = ("span",)

    def __init__(self, span: Span | None) -> None:
        self.span = span

    def answered(
        self,
        *,
        model: str,
        response_id: str | None,
        finish_reason: str | None,
        input_tokens: int,
        output_tokens: int,
        text: str,
    ) -> None:
        span = self.span
        if span is None or not span.is_recording():
            return
        span.set_attribute(GEN_AI_RESPONSE_MODEL, model)
        if response_id:
            span.set_attribute(GEN_AI_RESPONSE_ID, response_id)
        if finish_reason:
            span.set_attribute(GEN_AI_FINISH_REASONS, [finish_reason])
        span.set_attribute(GEN_AI_INPUT_TOKENS, input_tokens)
        span.set_attribute(GEN_AI_OUTPUT_TOKENS, output_tokens)
        if _capture_content:
            output = [{"role": "assistant", "parts": [{"type": "text", "content": text}]}]
            span.set_attribute(GEN_AI_OUTPUT_MESSAGES, redact_text(json.dumps(output)))


_NO_CALL = LLMCall(None)


@contextlib.contextmanager
def llm_span(
    model: str, provider: str, messages: object, server: tuple[str, int | None] | None = None
) -> Iterator[LLMCall]:
    """A CLIENT span ``chat {model}`` around one call to ``model``; an exception leaving it
    (a breaker's refusal included) marks it failed with ``error.type``."""
    if _tracer is None:
        yield _NO_CALL
        return
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    attributes: dict[str, Any] = {
        GEN_AI_OPERATION: "chat",
        GEN_AI_PROVIDER: provider,
        GEN_AI_REQUEST_MODEL: model,
    }
    if server is not None:
        attributes["server.address"] = server[0]
        if server[1] is not None:
            attributes["server.port"] = server[1]
    if _capture_content:
        attributes[GEN_AI_INPUT_MESSAGES] = redact_text(json.dumps(messages, default=str))
    with _tracer.start_as_current_span(
        f"chat {model}",
        kind=trace.SpanKind.CLIENT,
        attributes=attributes,
        record_exception=False,  # an exception's text may quote the answer: type only
        set_status_on_exception=False,
    ) as span:
        try:
            yield LLMCall(span)
        except BaseException as exc:
            span.set_attribute(ERROR_TYPE, type(exc).__qualname__)
            span.set_status(Status(StatusCode.ERROR, type(exc).__qualname__))
            raise
