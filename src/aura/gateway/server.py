"""The gateway's HTTP server: uvicorn, with a deadline and a size limit on every read.

uvicorn (0.55) bounds only the idle time between keep-alive requests
(``timeout_keep_alive``). A connection that never sends a byte, or sends its headers a
byte at a time, or trickles its body at 1 byte/s, is served forever: 20,202 half-sent
requests took a gateway to its open-file limit, and 70 trickled uploads held all its
admission slots. ``GuardedHttpTools`` (uvicorn's httptools protocol, the one it picks
with httptools installed) adds, per connection:

    phase                  bound (setting)                          then
    a new connection, or   headers complete within                  408, closed
      a request's first      GATEWAY_HEADER_TIMEOUT (10 s)
      byte                 and at most GATEWAY_MAX_HEADER_BYTES      431, closed
                             (64 KiB)
    the body               GATEWAY_BODY_MIN_RATE (1 KiB/s) on        408, closed
                             average after GATEWAY_BODY_GRACE (10 s),
                             no pause over GATEWAY_BODY_IDLE_TIMEOUT
                             (30 s); not counted while the app has
                             paused reading (its buffer is full)
    between requests       GATEWAY_KEEP_ALIVE_TIMEOUT (5 s)         closed
    connections            GATEWAY_MAX_CONNECTIONS (10,000)         503 (uvicorn)

and answers a request the parser refuses (a NUL in a header, a bad request line) with
our error body instead of uvicorn's plain text. Every answer it writes itself closes the
connection.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from aura.config import Settings, get_settings
from aura.gateway.guard import error_body

__all__ = ["GuardedHttpTools", "ReadLimits", "serve"]

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class ReadLimits:
    """The bounds ``GuardedHttpTools`` applies (from Settings by default)."""

    def __init__(self, settings: Settings | None = None) -> None:
        settings = settings or get_settings()
        self.header_timeout = settings.gateway_header_timeout
        self.max_header_bytes = settings.gateway_max_header_bytes
        self.body_min_rate = settings.gateway_body_min_rate
        self.body_grace = settings.gateway_body_grace
        self.body_idle_timeout = settings.gateway_body_idle_timeout


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with deadlines on the header and body reads."""

    configured: ReadLimits | None = None  # set by ``serve``; else read from Settings
    _CHECK_EVERY = 1.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = type(self).configured or ReadLimits()
        self._in_headers = True  # a new connection waits for its first request's headers
        self._header_bytes = 0
        self._phase_started = time.monotonic()
        self._body_bytes = 0
        self._last_byte = time.monotonic()
        self._watch: asyncio.TimerHandle | None = None

    # -- the phases ---------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._start_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_watch()
        super().connection_lost(exc)

    def _start_headers(self) -> None:
        self._in_headers = True
        self._header_bytes = 0
        self._phase_started = time.monotonic()
        self._arm(self.limits.header_timeout)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._in_headers:  # a keep-alive request: its deadline runs from now
            self._start_headers()

    def on_headers_complete(self) -> None:
        self._in_headers = False
        now = time.monotonic()
        self._phase_started = self._last_byte = now
        self._body_bytes = 0
        self._arm(self._CHECK_EVERY)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        self._last_byte = time.monotonic()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._stop_watch()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # between requests uvicorn's keep-alive timer runs; the next byte starts headers
        self._in_headers = False

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_headers and not self.transport.is_closing():  # still no end of headers
            self._header_bytes += len(data)
            if self._header_bytes > self.limits.max_header_bytes:
                self._refuse(431, "too_large", "the request's headers are too large")

    # -- the watch ----------------------------------------------------------------------

    def _arm(self, delay: float) -> None:
        self._stop_watch()
        self._watch = self.loop.call_later(delay, self._check)

    def _stop_watch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def _check(self) -> None:
        self._watch = None
        if self.transport.is_closing():
            return
        now = time.monotonic()
        if self._in_headers:
            if now - self._phase_started >= self.limits.header_timeout:
                self._refuse(408, "timeout", "the request's headers did not arrive in time")
                return
            self._arm(self.limits.header_timeout - (now - self._phase_started))
            return
        if self.cycle is None or not self.cycle.more_body:
            return  # the body is all here: the app's time is not the client's
        if self.flow.read_paused:  # the app is behind, not the client: start again
            self._phase_started = self._last_byte = now
            self._body_bytes = 0
        elif now - self._last_byte >= self.limits.body_idle_timeout:
            self._refuse(408, "timeout", "the request's body stopped arriving")
            return
        else:
            elapsed = now - self._phase_started - self.limits.body_grace
            if elapsed > 0 and self._body_bytes < self.limits.body_min_rate * elapsed:
                self._refuse(408, "timeout", "the request's body is arriving too slowly")
                return
        self._arm(self._CHECK_EVERY)

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer in our error format and close; the app, if running, sees a disconnect."""
        self._stop_watch()
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()  # too late for an answer of our own
            return
        body = error_body(code, message)
        head = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Error"))
        self.transport.write(
            head
            + b"content-type: application/json\r\ncontent-length: "
            + str(len(body)).encode()
            + b"\r\nconnection: close\r\n\r\n"
            + body
        )
        if self.cycle is not None:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()

    def send_400_response(self, msg: str) -> None:  # the parser refused the request
        self._refuse(400, "bad_request", f"malformed HTTP request ({msg.rstrip('.')})")


def serve(app: Any, *, host: str, port: int, settings: Settings | None = None) -> None:
    """Run ``app`` under uvicorn with the gateway's read limits (blocking)."""
    import uvicorn

    settings = settings or get_settings()
    GuardedHttpTools.configured = ReadLimits(settings)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_config=None,
        http=GuardedHttpTools,
        timeout_keep_alive=int(max(1, settings.gateway_keep_alive_timeout)),
        limit_concurrency=settings.gateway_max_connections,
    )
