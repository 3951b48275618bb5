"""A tiny OTLP/HTTP trace receiver for tests: what a real exporter in another process
sends to ``/v1/traces``, decoded (``ExportTraceServiceRequest``) into plain ``Span`` s."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.sdk.trace import ReadableSpan


@dataclass(frozen=True)
class Span:
    """What a test reads of a span, wherever it was recorded."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str | None
    kind: str  # SERVER, CLIENT, PRODUCER, CONSUMER, INTERNAL
    start: int  # ns since the epoch
    service: str
    attributes: dict[str, Any] = field(default_factory=dict)
    error: bool = False


_KINDS = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return tuple(_value(v) for v in value.array_value.values)
    return getattr(value, which) if which else None


def from_sdk(span: ReadableSpan) -> Span:
    """A span an in-process provider finished."""
    context = span.context
    assert context is not None
    return Span(
        span.name,
        f"{context.trace_id:032x}",
        f"{context.span_id:016x}",
        f"{span.parent.span_id:016x}" if span.parent else None,
        span.kind.name,
        span.start_time or 0,
        str(span.resource.attributes.get("service.name")),
        dict(span.attributes or {}),
        span.status.status_code.name == "ERROR",
    )


class OtlpReceiver:
    """``http://127.0.0.1:{port}/v1/traces`` in a thread; ``spans`` is all it received."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver._take(ExportTraceServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"

    def _take(self, request: ExportTraceServiceRequest) -> None:
        found: list[Span] = []
        for resource_spans in request.resource_spans:
            service = next(
                (
                    _value(a.value)
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        Span(
                            span.name,
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex() or None,
                            _KINDS.get(span.kind, "INTERNAL"),
                            span.start_time_unix_nano,
                            str(service),
                            {a.key: _value(a.value) for a in span.attributes},
                            span.status.code == 2,  # STATUS_CODE_ERROR
                        )
                    )
        with self._lock:
            self.spans.extend(found)

    def matching(self, wanted: Callable[[Span], bool]) -> list[Span]:
        with self._lock:
            return [span for span in self.spans if wanted(span)]

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def in_trace(spans: list[Span], trace_id: str) -> Iterator[Span]:
    return (span for span in spans if span.trace_id == trace_id)
