"""Authentication before admission: a request with a missing or wrong key never takes an
admission slot, never waits behind tenants, and cannot flood the database with lookups.

``Authenticator`` runs outside ``LoadShedder``. For a tenant path (``/v1/tenants/{id}/``)
it reads ``X-API-Key`` and decides, in order:

    key                                   answer
    missing                               401, a failure for the client's address
    valid, cached (KeyCache, 10 s)        on to admission, as that tenant (no round trip)
    known wrong (this cache, 60 s)        401, a failure; no database session
    missing, wrong or unknown, address    429 + Retry-After after a one-second pause
      past its failures                     (the tarpit), connection closed; no session
      (GATEWAY_AUTH_FAILURES_PER_SECOND,
      a token bucket per address)
    unknown, no lookup free within 1 s    the same
      (``max_lookups`` at once)
    unknown: looked up (one session;      valid: cached, on; wrong: cached wrong, 401
      one at a time per key)
    valid for another tenant              404 unknown tenant

A key valid in the last ``recent_ttl`` seconds (5 minutes) is never limited nor queued
behind unknown keys' lookups, so a flood of bad keys from the address a tenant shares (a
NAT, a proxy) does not lock the tenant out when its cache entry expires. The tenant goes
in the scope (``TENANT_SCOPE_KEY``): the admission's fair share is per tenant, and the
route does not look the key up again.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import structlog
from starlette.types import ASGIApp, Receive, Scope, Send

from aura.gateway.auth import KEY_PREFIX, hash_key
from aura.gateway.guard import TENANT_SCOPE_KEY, error_body, is_unavailable

__all__ = ["TENANT_SCOPE_KEY", "Authenticator", "FailureLimiter"]

_TENANT_PATH = re.compile(r"^/v1/tenants/([^/]+)(?:/|$)")
_log = structlog.get_logger("aura.gateway")


class FailureLimiter:
    """A token bucket per client address: ``rate`` failures a second, ``burst`` at once;
    at most ``size`` addresses remembered (the oldest forgotten first)."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        size: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else 2 * rate
        self.size = size
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _level(self, address: str) -> float:
        tokens, at = self._buckets.get(address, (self.burst, self.clock()))
        return min(self.burst, tokens + (self.clock() - at) * self.rate)

    def allowed(self, address: str) -> bool:
        """Whether ``address`` may try once more (does not spend)."""
        return self._level(address) >= 1.0

    def spend(self, address: str) -> None:
        """One failure (or unknown-key lookup) by ``address``."""
        self._buckets[address] = (max(self._level(address) - 1.0, 0.0), self.clock())
        self._buckets.move_to_end(address)
        while len(self._buckets) > self.size:
            self._buckets.popitem(last=False)

    def retry_after(self, address: str) -> int:
        return max(1, int((1.0 - self._level(address)) / self.rate + 0.999))


class _Expiring:
    """Key hashes with an expiry, at most ``size`` (oldest out)."""

    def __init__(self, ttl: float, size: int, clock: Callable[[], float]) -> None:
        self.ttl, self.size, self.clock = ttl, size, clock
        self._items: OrderedDict[str, float] = OrderedDict()

    def __contains__(self, digest: object) -> bool:
        until = self._items.get(str(digest))
        return until is not None and until > self.clock()

    def add(self, digest: str) -> None:
        self._items[digest] = self.clock() + self.ttl
        self._items.move_to_end(digest)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def discard(self, digest: str) -> None:
        self._items.pop(digest, None)


class Authenticator:
    """See the module's docstring. ``gateway_of(scope)`` finds the app's ``Gateway``
    (its database and key cache) at request time: it is made in the app's lifespan."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        failures_per_second: float = 20.0,
        max_lookups: int = 8,
        wrong_ttl: float = 60.0,
        recent_ttl: float = 300.0,
        tarpit: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.limiter = FailureLimiter(failures_per_second, clock=clock)
        self.wrong = _Expiring(wrong_ttl, 100_000, clock)
        self.recent = _Expiring(recent_ttl, 100_000, clock)
        self.lookups = asyncio.Semaphore(max_lookups)
        self.max_lookups = max_lookups
        self.tarpit = tarpit
        self._lookups_of: dict[str, asyncio.Future[uuid.UUID | None]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        found = _TENANT_PATH.match(str(scope.get("path", "")))
        if found is None:
            await self.app(scope, receive, send)
            return
        try:
            tenant_id = uuid.UUID(found.group(1))
        except ValueError:
            await self.app(scope, receive, send)  # the route answers it (422)
            return
        if not _routed(scope):  # OPTIONS, 404, 405: the router's answers need no key
            await self.app(scope, receive, send)
            return
        answer = await self._authenticate(scope, tenant_id)
        if answer is not None:
            await _answer(send, *answer)
            return
        scope[TENANT_SCOPE_KEY] = tenant_id
        await self.app(scope, receive, send)

    async def _authenticate(
        self, scope: Scope, tenant_id: uuid.UUID
    ) -> tuple[int, str, str, dict[str, str]] | None:
        """None when the request goes on; else (status, code, message, headers)."""
        address = _address(scope)
        key = _header(scope, b"x-api-key")
        if not key:
            return await self._failed(address, "missing X-API-Key header")
        gateway = scope["app"].state.gateway
        digest = hash_key(key)
        owner = gateway.keys.cached(key, digest)
        if owner is None:
            if digest in self.wrong or not _well_formed(key):
                return await self._failed(address, "invalid API key")
            known = digest in self.recent  # valid lately: its refresh is never limited
            if not known and not self.limiter.allowed(address):
                return await self._limited(address)
            try:
                owner = await self._look_up(gateway, key, digest, known)
            except TimeoutError:
                return await self._limited(address)
            except Exception as exc:
                if not is_unavailable(exc):
                    raise
                message = "a dependency is unavailable; retry later"
                return 503, "unavailable", message, {"retry-after": "1"}
            if owner is None:
                self.wrong.add(digest)
                return await self._failed(address, "invalid API key")
            self.recent.add(digest)
        elif digest not in self.recent:
            self.recent.add(digest)
        if owner != tenant_id:
            message = f"unknown tenant {tenant_id}"
            return 404, "not_found", message, {}
        structlog.contextvars.bind_contextvars(tenant=str(tenant_id))
        return None

    async def _look_up(self, gateway: Any, key: str, digest: str, known: bool) -> uuid.UUID | None:
        """One database lookup per key at a time (the others with the same key await
        it: a tenant's first burst costs one round trip); unknown keys share
        ``max_lookups`` of them and wait at most a second for one."""
        running = self._lookups_of.get(digest)
        if running is not None:
            return await asyncio.shield(running)

        async def look() -> uuid.UUID | None:
            async with contextlib.AsyncExitStack() as stack:
                if not known:
                    await asyncio.wait_for(self.lookups.acquire(), 1.0)
                    stack.callback(self.lookups.release)
                session = await stack.enter_async_context(gateway.database.session())
                found: uuid.UUID | None = await gateway.keys.tenant_for_key(session, key)
                return found

        task = asyncio.ensure_future(look())
        self._lookups_of[digest] = task
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._lookups_of.pop(digest, None)
            else:
                task.add_done_callback(lambda _: self._lookups_of.pop(digest, None))

    async def _failed(self, address: str, message: str) -> tuple[int, str, str, dict[str, str]]:
        """A failure: 401 while the address has failures left, else the tarpit."""
        if not self.limiter.allowed(address):
            return await self._limited(address)
        self.limiter.spend(address)
        return _unauthorized(message)

    async def _limited(self, address: str) -> tuple[int, str, str, dict[str, str]]:
        """429, after a pause, on a connection that is then closed: an address past its
        failures is answered at most once a ``tarpit`` per connection, so a flood costs
        the gateway a sleeping coroutine, not its CPU (answering 429s as fast as they
        came took 12,000 a second from its tenants)."""
        self.limiter.spend(address)
        retry_after = self.limiter.retry_after(address)
        await asyncio.sleep(self.tarpit)
        return _limited(retry_after)


def _routed(scope: Scope) -> bool:
    """A route takes this method on this path (what the router would run)."""
    from starlette.routing import Match

    router = getattr(scope.get("app"), "router", None)
    routes = getattr(router, "routes", ())
    return any(route.matches(scope)[0] is Match.FULL for route in routes)


def _well_formed(key: str) -> bool:
    return key.startswith(KEY_PREFIX) and len(key) <= 200 and key.isprintable()


def _address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _unauthorized(message: str) -> tuple[int, str, str, dict[str, str]]:
    return 401, "unauthorized", message, {}


def _limited(seconds: int) -> tuple[int, str, str, dict[str, str]]:
    return (
        429,
        "too_many_requests",
        "too many failed or unknown keys from this address; retry later",
        {"retry-after": str(seconds), "connection": "close"},
    )


async def _answer(send: Send, status: int, code: str, message: str, headers: Any) -> None:
    fields = [{"field": "X-API-Key", "message": message}] if status == 401 else None
    body = error_body(code, message, fields)
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.encode(), v.encode()) for k, v in headers.items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
