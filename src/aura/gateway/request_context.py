"""Each request's log lines carry its request id (and, once authorized, its tenant).

``RequestContext`` is a plain ASGI middleware: it takes the caller's ``X-Request-ID``
when it is a sane token (1-128 characters of letters, digits and ``-_.:``), makes one
otherwise, binds it with structlog's context variables for everything the request runs,
and returns it in the response's ``X-Request-ID`` header. A plain ASGI middleware, not
Starlette's ``BaseHTTPMiddleware``: the endpoint runs in the same task, so what is bound
here is seen there (and what the endpoint binds, such as the tenant, stays in the
request).
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import structlog

__all__ = ["REQUEST_ID_HEADER", "RequestContext"]

REQUEST_ID_HEADER = "x-request-id"
_SANE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def _request_id(scope: dict[str, Any]) -> str:
    for name, value in scope.get("headers") or ():
        if name == REQUEST_ID_HEADER.encode():
            text = str(value.decode("latin-1"))
            if _SANE.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


class RequestContext:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k != REQUEST_ID_HEADER.encode()
                ]
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        before = structlog.contextvars.get_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:  # what the request bound (its tenant) ends with it
            structlog.contextvars.clear_contextvars()
            structlog.contextvars.bind_contextvars(**before)
