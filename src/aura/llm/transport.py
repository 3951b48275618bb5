"""The LLM client's HTTP transport: httpx's API over aiohttp's connection pool.

httpcore's pool costs CPU in proportion to the requests waiting on it (encode/httpx#3215):
measured in ``bench/async_worker.py``, 100 LLM calls in flight in one process spent
~20 ms of CPU each in ``AsyncConnectionPool._assign_requests_to_connections``. The
``httpx-aiohttp`` transport (what the openai SDK offers as ``DefaultAioHttpClient``)
keeps ``http_client`` an ``httpx.AsyncClient`` -- the seed's API, timeouts and error
classes -- with aiohttp's pool underneath.

Its error mapping is coarse (a reset or a server hanging up becomes ``ConnectTimeout``),
so this subclass maps by cause: a refused or unresolvable connect is ``ConnectError``, a
connect that timed out ``ConnectTimeout``, silence past the read timeout ``ReadTimeout``,
and a connection dropped mid-answer ``ReadError`` -- as httpcore reports them, so the
client's ``LLMTimeoutError`` / ``LLMConnectionError`` mean what they meant.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

__all__ = ["LLMTransport"]


def _remap(exc: httpx.TransportError) -> httpx.TransportError:
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(str(cause))
    if isinstance(cause, aiohttp.SocketTimeoutError | aiohttp.ServerTimeoutError):
        return httpx.ReadTimeout(str(cause))
    if isinstance(cause, aiohttp.ClientConnectorError):
        return httpx.ConnectError(str(cause))
    if isinstance(
        cause,
        aiohttp.ServerDisconnectedError
        | aiohttp.ClientOSError
        | aiohttp.ClientPayloadError
        | ConnectionError,
    ):
        return httpx.ReadError(str(cause) or type(cause).__name__)
    return exc


class _RemappedStream(httpx.AsyncByteStream):
    def __init__(self, stream: httpx.AsyncByteStream) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                yield chunk
        except httpx.TransportError as exc:
            raise _remap(exc) from exc.__cause__
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc

    async def aclose(self) -> None:
        # Closing a connection that already broke: nothing left to report.
        with contextlib.suppress(httpx.TransportError, aiohttp.ClientError):
            await self._stream.aclose()


class LLMTransport(AiohttpTransport):
    """``AiohttpTransport`` sized for ``connections`` calls in flight, errors remapped."""

    def __init__(self, connections: int) -> None:
        super().__init__(
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            trust_env=False,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response: httpx.Response = await super().handle_async_request(request)
        except httpx.TransportError as exc:
            raise _remap(exc) from exc.__cause__
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        response.stream = _RemappedStream(response.stream)  # type: ignore[arg-type]
        return response
