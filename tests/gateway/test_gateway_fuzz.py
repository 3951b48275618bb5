"""schemathesis (``--checks all``, request bodies fuzzed from the OpenAPI document) against a
real ``aura gateway`` process with a real tenant: no 5xx, every status and body as
documented. A short run; ``scripts/schemathesis.sh`` runs a longer one."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from aura.db import Database
from aura.gateway import Gateway, create_app, create_tenant_with_key
from tests.helpers import running_gateway

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def gateway(pg_url: str, amqp_url: str, redis_url: str, tmp_path: Path) -> Iterator[str]:
    env = {
        "DATABASE_URL": pg_url,
        "CELERY_BROKER_URL": amqp_url,
        "REDIS_URL": redis_url,
        "LOG_LEVEL": "WARNING",
    }
    with running_gateway(env, tmp_path / "gateway.log") as (port, _):
        yield f"http://127.0.0.1:{port}"


@pytest.mark.timeout(120)
async def test_schemathesis_finds_nothing(
    gateway: str, pg_database: Database, tmp_path: Path
) -> None:
    async with pg_database.session() as session:
        tenant, key = await create_tenant_with_key(session, f"fuzz-{uuid.uuid4().hex[:8]}")
        await session.commit()
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert exe is not None, "schemathesis is in the dev extra"
    done = await asyncio.to_thread(
        subprocess.run,
        [
            exe,
            "--config-file",
            str(ROOT / "scripts" / "schemathesis.toml"),
            "run",
            f"{gateway}/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            "12",
            "--seed",
            "13",
        ],
        env={
            **os.environ,
            "AURA_API_KEY": key,
            "AURA_TENANT_ID": str(tenant.id),
            "NO_COLOR": "1",
        },
        cwd=tmp_path,  # its cache (.schemathesis/) stays out of the checkout
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-6000:]
    assert "8 selected / 8 total" in done.stdout
    # Bodies were fuzzed: the run made products and imports for the real tenant.
    async with httpx.AsyncClient(base_url=gateway, headers={"X-API-Key": key}) as client:
        listed = await client.get(f"/v1/tenants/{tenant.id}/products")
    assert listed.status_code == 200
    assert listed.json()["total"] > 0, done.stdout[-3000:]


async def test_the_openapi_document_tells_the_truth_and_routing_errors_are_ours(
    pg_database: Database,
) -> None:
    app = create_app(Gateway(pg_database, None, {}))  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        document = (await client.get("/openapi.json")).json()
        unknown = await client.get("/v2/nothing")
        options = await client.options(f"/v1/tenants/{uuid.uuid4()}/products")
        delete = await client.delete(f"/v1/tenants/{uuid.uuid4()}/products")
    schemas = document["components"]["schemas"]
    assert {"ProductIn", "VariantIn", "ProductOut", "ErrorBody", "ImportCounts"} <= set(schemas)
    assert document["components"]["securitySchemes"]["APIKeyHeader"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "The tenant's API key",
    }
    create = document["paths"]["/v1/tenants/{tenant_id}/products"]["post"]
    assert create["security"] == [{"APIKeyHeader": []}]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ProductIn"
    }
    assert set(create["responses"]) == {"201", "401", "404", "409", "413", "415", "422", "503"}
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    assert create["responses"]["415"]["content"]["application/json"]["schema"] == error_ref
    assert "Retry-After" in create["responses"]["503"]["headers"]
    imports = document["paths"]["/v1/tenants/{tenant_id}/imports"]["post"]
    assert {"application/json", "application/x-ndjson"} <= set(imports["requestBody"]["content"])
    assert "/metrics" in document["paths"]

    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "not_found"
    assert options.status_code == 204
    assert options.headers["allow"] == "GET, OPTIONS, POST"
    assert delete.status_code == 405
    assert delete.headers["allow"] == "GET, OPTIONS, POST"
    assert delete.json()["error"]["code"] == "method_not_allowed"
