"""How a provider's request goes out: one aiohttp session (the default) or httpx.

Why aiohttp, measured (bench/llm_transport.py, bench/RESULTS.md): at 500 calls in flight
httpx's own pool costs 14-41 ms of CPU per call and 6-18x the wall time of bare aiohttp
(0.4-0.7 ms); httpx over aiohttp (``httpx_aiohttp``) costs 0.8-1.2 ms, and httpx's
request and response objects on top were half a call's CPU in the worker
(bench/async_worker.py: 0.96 -> 0.41 ms per call once calls went straight to the
session). So ``AiohttpWire`` sends plain and streamed calls on the session itself.

Why httpx stays: the seed's contract is ``client.http_client``, an ``httpx.AsyncClient``
(here over the same aiohttp pool), ``LLM_HTTP_TRANSPORT=httpx`` selects httpx's own pool,
and an ``httpx`` transport is how tests inject a provider (``httpx.MockTransport``):
``HttpxWire`` sends through ``http_client``. Both wires answer in the same shape
(``Answer``, ``Reply``) and raise their libraries' errors, which ``transport_error`` maps
to Aura's -- the one mapping, used by the client for both. aiohttp has no write timeout;
connect, read (per read) and pool hold on both.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from aura.errors import LLMConnectionError, LLMError, LLMTimeoutError
from aura.llm._provider import MAX_ERROR_TEXT
from aura.logs import bounded_text

__all__ = [
    "WIRE_ERRORS",
    "AiohttpWire",
    "Answer",
    "HttpxWire",
    "Reply",
    "Wire",
    "encode",
    "transport_error",
]

# What a wire raises for a call that never got an answer (mapped by transport_error);
# checked before TimeoutError: aiohttp's timeouts are both
WIRE_ERRORS = (httpx.RequestError, aiohttp.ClientError)
_JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole answer. ``headers`` look up without regard to case; ``reason`` is the
    server's phrase, else the status's standard one ("" for an unknown status)."""

    status: int
    headers: Mapping[str, str]
    content: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer whose body is still coming (a stream)."""

    status: int
    headers: Mapping[str, str]
    reason: str
    body: AsyncIterator[bytes]

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.body])


class Wire(Protocol):
    """Sends JSON bodies to one base URL; see the module doc."""

    @property
    def http_client(self) -> httpx.AsyncClient: ...

    async def post(self, path: str, content: bytes) -> Answer: ...

    def stream(self, path: str, content: bytes) -> AbstractAsyncContextManager[Reply]: ...

    async def aclose(self) -> None: ...


def encode(body: dict[str, Any]) -> bytes:
    """JSON as httpx encodes ``json=``: compact, UTF-8, NaN refused (a ValueError)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def transport_error(exc: httpx.RequestError | aiohttp.ClientError) -> LLMError:
    """A wire's error as ours, the phase named as httpx names it. httpx_aiohttp maps
    every aiohttp connection error, a reset included, to ``httpx.ConnectTimeout``: its
    cause tells."""
    cause = exc.__cause__ if isinstance(exc, httpx.HTTPError) else exc
    if isinstance(cause, aiohttp.SocketTimeoutError):  # a read (ClientTimeout.sock_read)
        return LLMTimeoutError("ReadTimeout talking to the LLM provider")
    if isinstance(cause, aiohttp.ServerTimeoutError):  # connecting, or waiting for the pool
        return LLMTimeoutError("ConnectTimeout talking to the LLM provider")
    if not isinstance(cause, aiohttp.ClientError):
        cause = exc
        if isinstance(exc, httpx.TimeoutException):  # ReadTimeout, ConnectTimeout, PoolTimeout
            return LLMTimeoutError(f"{type(exc).__name__} talking to the LLM provider")
    return LLMConnectionError(bounded_text(f"{type(cause).__name__}: {cause}", MAX_ERROR_TEXT))


def _limits(max_connections: int) -> httpx.Limits:
    return httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)


class AiohttpWire:
    """Calls on one aiohttp session (made on first use, in the loop that uses it), whose
    pool ``http_client`` shares."""

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        *,
        timeout: httpx.Timeout,
        max_connections: int,
    ) -> None:
        self._base_url = base_url
        self._headers = {**headers, **_JSON}
        self._limits = _limits(max_connections)
        self._session: aiohttp.ClientSession | None = None
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers=dict(headers),
            timeout=timeout,
            limits=self._limits,
            transport=AiohttpTransport(limits=self._limits, client=self._aiohttp_session),
            follow_redirects=False,
        )
        # as httpx_aiohttp maps httpx's phases
        self._timeout = aiohttp.ClientTimeout(
            sock_connect=timeout.connect, sock_read=timeout.read, connect=timeout.pool
        )

    @property
    def http_client(self) -> httpx.AsyncClient:
        return self._client

    def _aiohttp_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._limits.max_connections or 0,
                keepalive_timeout=self._limits.keepalive_expiry,
            )
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    def _post(self, path: str, content: bytes) -> Any:
        return self._aiohttp_session().post(
            self._base_url + path,
            data=content,
            headers=self._headers,
            timeout=self._timeout,
            allow_redirects=False,
        )

    async def post(self, path: str, content: bytes) -> Answer:
        async with self._post(path, content) as response:
            body = await response.read()
            return Answer(
                response.status, response.headers, body, response.reason or _phrase(response.status)
            )

    @asynccontextmanager
    async def stream(self, path: str, content: bytes) -> AsyncIterator[Reply]:
        async with self._post(path, content) as response:
            reason = response.reason or _phrase(response.status)
            yield Reply(response.status, response.headers, reason, response.content.iter_any())

    async def aclose(self) -> None:
        await self._client.aclose()
        if self._session is not None:
            await self._session.close()


class HttpxWire:
    """Calls through ``http_client``: httpx's own pool, or a given transport."""

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        *,
        timeout: httpx.Timeout,
        max_connections: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers=dict(headers),
            timeout=timeout,
            limits=_limits(max_connections),
            transport=transport,
            follow_redirects=False,
        )

    @property
    def http_client(self) -> httpx.AsyncClient:
        return self._client

    async def post(self, path: str, content: bytes) -> Answer:
        response = await self._client.post(path, content=content, headers=_JSON)
        return Answer(
            response.status_code, response.headers, response.content, response.reason_phrase
        )

    @asynccontextmanager
    async def stream(self, path: str, content: bytes) -> AsyncIterator[Reply]:
        async with self._client.stream("POST", path, content=content, headers=_JSON) as response:
            reason = response.reason_phrase
            yield Reply(response.status_code, response.headers, reason, response.aiter_bytes())

    async def aclose(self) -> None:
        await self._client.aclose()
