"""Tenant API keys: shown once when made, stored only as a SHA-256 hash.

Keys are 32 random bytes (``aura_`` + URL-safe base64), so a plain SHA-256 is enough to
store them: there is nothing to brute-force that a slow hash would protect.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from aura.db import Tenant, create_tenant

__all__ = ["create_tenant_with_key", "hash_key", "new_key", "tenant_for_key"]

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
