"""Tenant API keys: shown once when made, stored only as a SHA-256 hash.

Keys are 32 random bytes (``aura_`` + URL-safe base64), so a plain SHA-256 is enough to
store them: there is nothing to brute-force that a slow hash would protect.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from aura.catalog import Tenant, create_tenant

__all__ = ["KeyCache", "create_tenant_with_key", "hash_key", "new_key", "tenant_for_key"]

KEY_PREFIX = "aura_"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def create_tenant_with_key(session: AsyncSession, name: str) -> tuple[Tenant, str]:
    """A new tenant and its API key (the only time the key exists in clear)."""
    key = new_key()
    tenant = await create_tenant(session, name, api_key_hash=hash_key(key))
    return tenant, key


async def tenant_for_key(session: AsyncSession, key: str) -> uuid.UUID | None:
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    found: uuid.UUID | None = await session.scalar(
        select(Tenant.id).where(Tenant.api_key_hash == hash_key(key))
    )
    return found


class KeyCache:
    """Keys recently found valid, by hash, for ``ttl`` seconds (at most ``size`` of them):
    a request does not spend a database round trip on its key. A deleted tenant's key
    keeps working in this process for at most ``ttl``; unknown keys are never cached."""

    def __init__(
        self, ttl: float = 10.0, size: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl, self.size, self.clock = ttl, size, clock
        self._found: OrderedDict[str, tuple[uuid.UUID, float]] = OrderedDict()

    def cached(self, key: str, digest: str | None = None) -> uuid.UUID | None:
        """The key's tenant if it was found valid within ``ttl``; no database round trip
        (``digest``: the key's ``hash_key``, if the caller has it)."""
        hit = self._found.get(digest or hash_key(key))
        if hit is not None and hit[1] > self.clock():
            return hit[0]
        return None

    async def tenant_for_key(self, session: AsyncSession, key: str) -> uuid.UUID | None:
        found = self.cached(key)
        if found is not None:
            return found
        digest = hash_key(key)
        tenant = await tenant_for_key(session, key)
        if tenant is not None:
            self._found[digest] = (tenant, self.clock() + self.ttl)
            self._found.move_to_end(digest)
            while len(self._found) > self.size:
                self._found.popitem(last=False)
        return tenant
