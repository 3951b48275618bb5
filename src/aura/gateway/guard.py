"""The last line: an exception no handler took becomes our error body, never a dropped
connection.

Starlette answers an unhandled exception with a bare 500 and then re-raises it, so the
server logs a traceback and closes the keep-alive connection. ``ErrorGuard`` sits inside
that: a dependency that went away (the database connection dropped, a full pool, a
refused connect) is ``503 unavailable`` with ``Retry-After``; anything else is a bug,
logged once with its traceback and answered ``500 internal`` in our format. Either way the
connection stays open for the client's next request.
"""

from __future__ import annotations

import json
from typing import Any

import structlog
from sqlalchemy import exc as sa_exc
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aura.db.transactional import is_network_error
from aura.errors import cause_chain

__all__ = [
    "DEFAULT_MAX_IN_FLIGHT",
    "RETRY_AFTER_SECONDS",
    "ErrorGuard",
    "LoadShedder",
    "error_body",
    "is_unavailable",
]

RETRY_AFTER_SECONDS = 1
DEFAULT_MAX_IN_FLIGHT = 64
_log = structlog.get_logger("aura.gateway")


def error_body(code: str, message: str, fields: list[dict[str, str]] | None = None) -> bytes:
    body: dict[str, Any] = {"code": code, "message": message}
    if fields:
        body["fields"] = fields
    return json.dumps({"error": body}).encode()


def is_unavailable(exc: BaseException) -> bool:
    """A dependency is down or saturated (retry later), not a bug."""
    if is_network_error(exc):
        return True
    return any(
        isinstance(link, sa_exc.TimeoutError | OSError | TimeoutError) for link in cause_chain(exc)
    )


class ErrorGuard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:  # too late to answer: let the server close it
                raise
            if is_unavailable(exc):
                status, headers = 503, [(b"retry-after", str(RETRY_AFTER_SECONDS).encode())]
                body = error_body("unavailable", "a dependency is unavailable; retry later")
                _log.warning(
                    "request failed: a dependency is unavailable",
                    path=scope.get("path", ""),
                    error=f"{type(exc).__name__}",
                )
            else:
                status, headers = 500, []
                body = error_body("internal", "internal error")
                _log.exception("request failed with an unexpected error", path=scope.get("path"))
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        *headers,
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})


class LoadShedder:
    """At most ``limit`` tenant requests at once; the next is ``503 overloaded`` with
    ``Retry-After`` at once, before it holds a database connection or a byte of its body.

    Past its capacity a gateway otherwise queues requests on the database pool until
    latency runs away and they time out; shedding keeps the ones it serves fast and tells
    the others, cheaply, when to come back. Health, readiness and metrics are never shed.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            body = error_body("overloaded", "the gateway is at capacity; retry later")
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"retry-after", str(RETRY_AFTER_SECONDS).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
