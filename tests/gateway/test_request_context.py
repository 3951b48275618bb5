"""The gateway's request id: taken from a sane X-Request-ID or made, bound to every log
line of the request, returned in the response."""

from __future__ import annotations

from typing import Any

import httpx
import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from aura.gateway.request_context import RequestContext


def _client() -> httpx.AsyncClient:
    async def endpoint(_: Request) -> JSONResponse:
        structlog.contextvars.bind_contextvars(tenant="t-1")  # as authorize() does
        return JSONResponse(structlog.contextvars.get_contextvars())

    app: Any = RequestContext(Starlette(routes=[Route("/", endpoint)]))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


async def test_a_sane_request_id_is_kept_and_returned() -> None:
    async with _client() as client:
        response = await client.get("/", headers={"X-Request-ID": "abc-123"})
    assert response.json() == {"request_id": "abc-123", "tenant": "t-1"}
    assert response.headers["x-request-id"] == "abc-123"
    assert structlog.contextvars.get_contextvars() == {}


async def test_a_missing_or_strange_request_id_is_replaced() -> None:
    async with _client() as client:
        made = await client.get("/")
        strange = await client.get("/", headers={"X-Request-ID": "a b\x7f" + "x" * 200})
    for response in (made, strange):
        request_id = response.headers["x-request-id"]
        assert len(request_id) == 32
        assert response.json()["request_id"] == request_id
    assert made.headers["x-request-id"] != strange.headers["x-request-id"]
