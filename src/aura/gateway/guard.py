"""The last line: an exception no handler took becomes our error body, never a dropped
connection.

Starlette answers an unhandled exception with a bare 500 and then re-raises it, so the
server logs a traceback and closes the keep-alive connection. ``ErrorGuard`` sits inside
that: a dependency that went away (the database connection dropped, a full pool, a
refused connect) is ``503 unavailable`` with ``Retry-After``; anything else is a bug,
logged once with its traceback and answered ``500 internal`` in our format. Either way the
connection stays open for the client's next request.

``LoadShedder`` admits tenant requests (its docstring), and holds new writes while the
broker blocks publishing: ``503 unavailable`` with ``Retry-After`` once its admission wait
ran out, before anything is staged.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
from collections.abc import Callable
from typing import Any

import structlog
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aura.db import is_unavailable as _db_unavailable

__all__ = [
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_MAX_WAIT",
    "DEFAULT_TENANT_SHARE",
    "RETRY_AFTER_SECONDS",
    "ErrorGuard",
    "LoadShedder",
    "error_body",
    "is_unavailable",
    "release_slot",
]

RETRY_AFTER_SECONDS = 1
# The scope key of an admitted request's "give my slot back now" (``release_slot``).
RELEASE_SLOT = "aura.release_slot"
# The scope key where ``Authenticator`` puts an authenticated request's tenant.
TENANT_SCOPE_KEY = "aura.tenant"
DEFAULT_MAX_IN_FLIGHT = 64
DEFAULT_MAX_WAIT = 1.0
DEFAULT_TENANT_SHARE = 0.5  # GATEWAY_TENANT_SHARE's default
_UNBLOCK_POLL = 0.05  # how often a held write looks whether the broker takes writes again
_log = structlog.get_logger("aura.gateway")


def error_body(code: str, message: str, fields: list[dict[str, str]] | None = None) -> bytes:
    body: dict[str, Any] = {"code": code, "message": message}
    if fields:
        body["fields"] = fields
    return json.dumps({"error": body}).encode()


def is_unavailable(exc: BaseException) -> bool:
    """A dependency is down or saturated (retry later), not a bug
    (``aura.db._transactional.is_unavailable``)."""
    return _db_unavailable(exc)


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
        except ClientDisconnect:  # the client went away mid-body: no one to answer
            _log.info("client disconnected before its request was read", path=scope.get("path"))
            return
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
    """At most ``limit`` tenant requests at once, and at most ``tenant_share`` of them
    (rounded up) for any one tenant. The next ones wait, in order, for at most
    ``max_wait`` seconds and at most ``max_waiting`` of them; past either bound a request
    is ``503 overloaded`` with ``Retry-After``, before it holds a database connection or
    reads a byte of its body. A tenant at its share waits for its own slots: a freed slot
    goes to the longest waiter whose tenant is below its share, so one tenant's slow or
    heavy requests delay only that tenant.

    Past its capacity a gateway otherwise queues requests on the database pool until
    latency runs away and they time out. Answering 503 at once is no better under clients
    that retry at once (load generators, naive retry loops): the gateway then spends its
    time refusing, and what it serves collapses. A short, bounded wait absorbs a burst,
    paces such clients to the rate the gateway serves, and bounds every answer's latency
    by ``max_wait`` plus the time to serve it. Health, readiness and metrics never wait;
    nor does a request that failed authentication (``Authenticator`` runs first and puts
    the tenant in the scope).

    A request may give its slot back early (``release_slot``): a write waiting for the
    broker's confirm of its committed message holds no connection, and holding slots
    through the broker's fsync made the confirm latency, not the gateway's CPU, the
    bound on what it served.

    While ``writes_blocked()`` (the broker blocks publishing: a resource alarm) a write
    (POST) waits up to ``max_wait`` for it to clear, holding no slot, then is ``503
    unavailable`` with ``Retry-After``: it is refused before it stages anything, where it
    used to be accepted and then wait out the broker's 30 s confirm timeout.
    """

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        *,
        max_wait: float = DEFAULT_MAX_WAIT,
        max_waiting: int | None = None,
        tenant_share: float = 1.0,
        writes_blocked: Callable[[], bool] | None = None,
    ) -> None:
        self.app = app
        self.writes_blocked = writes_blocked
        self.limit = limit
        self.max_wait = max_wait
        self.max_waiting = 4 * limit if max_waiting is None else max_waiting
        self.per_tenant = max(1, math.ceil(limit * tenant_share))
        self.in_flight = 0
        self.by_tenant: collections.Counter[object] = collections.Counter()
        self._waiters: collections.deque[tuple[object, asyncio.Future[None]]] = collections.deque()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        if scope.get("method") == "POST" and not await self._writes_taken():
            await _refuse(
                send, "unavailable", "the broker is blocking new messages (a resource alarm)"
            )
            return
        tenant = scope.get(TENANT_SCOPE_KEY)
        if not await self._admitted(tenant):
            await _refuse(send, "overloaded", "the gateway is at capacity")
            return
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self._release(tenant)

        scope[RELEASE_SLOT] = release
        try:
            await self.app(scope, receive, send)
        finally:
            release()

    async def _writes_taken(self) -> bool:
        """Whether the broker takes writes, or does again within ``max_wait``."""
        if self.writes_blocked is None:
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while self.writes_blocked():
            left = deadline - loop.time()
            if left <= 0:
                return False
            await asyncio.sleep(min(left, _UNBLOCK_POLL))
        return True

    def _eligible(self, tenant: object) -> bool:
        return self.in_flight < self.limit and self.by_tenant[tenant] < self.per_tenant

    def _take(self, tenant: object) -> None:
        self.in_flight += 1
        self.by_tenant[tenant] += 1

    async def _admitted(self, tenant: object) -> bool:
        # Waiters only ever wait for a reason (the gateway is full, or their tenant is at
        # its share): a request that is eligible now passes none that could go first.
        if self._eligible(tenant):
            self._take(tenant)
            return True
        if len(self._waiters) >= self.max_waiting or self.max_wait <= 0:
            return False
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((tenant, waiter))
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.max_wait)
        except TimeoutError:
            if waiter.done():  # a slot was handed over as the wait ran out: take it
                return True
            waiter.cancel()
            return False
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release(tenant)  # handed a slot, then cancelled: pass it on
            else:
                waiter.cancel()
            raise
        return True

    def _release(self, tenant: object) -> None:
        """Free the slot, then hand slots to the longest waiters that may take one."""
        self.in_flight -= 1
        self.by_tenant[tenant] -= 1
        if self.by_tenant[tenant] <= 0:
            del self.by_tenant[tenant]
        kept: collections.deque[tuple[object, asyncio.Future[None]]] = collections.deque()
        while self._waiters:
            waiting, waiter = self._waiters.popleft()
            if waiter.done():
                continue  # timed out or cancelled
            if self._eligible(waiting):
                self._take(waiting)  # counted now: the waiter owns it when it wakes
                waiter.set_result(None)
            else:
                kept.append((waiting, waiter))
        self._waiters = kept


def release_slot(scope: Scope) -> None:
    """Give the request's admission slot to the next one before the request ends: for a
    request whose remaining work holds no database connection and little memory (waiting
    for its publish). Once only; a no-op outside the LoadShedder."""
    release = scope.get(RELEASE_SLOT)
    if release is not None:
        release()


async def _refuse(send: Send, code: str, reason: str) -> None:
    """503 in our format, with ``Retry-After``."""
    body = error_body(code, f"{reason}; retry later")
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
