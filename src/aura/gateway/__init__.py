"""The API gateway (FastAPI): ``create_app``; ``aura gateway`` serves it with uvicorn."""

from aura.gateway.app import Gateway, create_app
from aura.gateway.auth import create_tenant_with_key, hash_key, tenant_for_key

__all__ = [
    "Gateway",
    "create_app",
    "create_tenant_with_key",
    "hash_key",
    "tenant_for_key",
]
