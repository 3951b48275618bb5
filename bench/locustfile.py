"""Locust users for bench/gateway_load.py: each creates products (unique SKUs) and, against
the gateway, posts small imports. AURA_TENANT_ID / AURA_API_KEY name the tenant;
AURA_BARE=1 marks the bare endpoint (it has no imports)."""

from __future__ import annotations

import itertools
import json
import os
import uuid

from locust import FastHttpUser, between, task

TENANT = os.environ["AURA_TENANT_ID"]
HEADERS = {"X-API-Key": os.environ.get("AURA_API_KEY", ""), "content-type": "application/json"}
BARE = os.environ.get("AURA_BARE") == "1"
_serial = itertools.count()


def product() -> str:
    sku = f"L-{uuid.uuid4().hex[:12]}-{next(_serial)}"
    return json.dumps({"title": "Load shoe", "variants": [{"sku": sku, "price": "9.90"}]})


class CatalogUser(FastHttpUser):
    wait_time = between(0.0, 0.05)

    @task(4)
    def create_product(self) -> None:
        self.client.post(
            f"/v1/tenants/{TENANT}/products", data=product(), headers=HEADERS, name="products"
        )

    @task(1)
    def small_import(self) -> None:
        if BARE:
            self.create_product()
            return
        body = "\n".join(product() for _ in range(5))
        self.client.post(
            f"/v1/tenants/{TENANT}/imports",
            data=body,
            headers={**HEADERS, "content-type": "application/x-ndjson"},
            name="imports",
        )
