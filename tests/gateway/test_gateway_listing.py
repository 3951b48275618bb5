"""Reading products back runs a constant number of statements: a page of 100 products
is two (the products with their enrichments, joined; their variants, by IN), where
reading each product on its own took three per product (302 for the page)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from sqlalchemy import event

from aura.catalog import Enrichment, create_product_with_variants
from aura.config import Settings
from aura.db import Database
from aura.gateway import Gateway, create_app, create_tenant_with_key
from aura.worker.celery_app import make_celery_app


@contextmanager
def statements(database: Database) -> Iterator[list[str]]:
    """The SQL statements ``database`` sends meanwhile."""
    sent: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    engine = database.engine.sync_engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", count)


async def catalog_of(database: Database, products: int) -> tuple[uuid.UUID, str, list[uuid.UUID]]:
    """A new tenant with ``products`` products of two variants each, every other enriched."""
    async with database.session() as session:
        tenant, key = await create_tenant_with_key(session, f"list-{uuid.uuid4().hex[:10]}")
        await session.commit()
    made = []
    async with database.session() as session:
        for i in range(products):
            variants = [{"sku": f"{i}-{s}", "price": "9.50", "currency": "EUR"} for s in "BA"]
            product = await create_product_with_variants(
                session, tenant.id, {"title": f"P{i}", "variants": variants}
            )
            made.append(product.id)
        for i, product_id in enumerate(made[::2]):
            session.add(
                Enrichment(
                    product_id=product_id,
                    tenant_id=tenant.id,
                    description=f"d{i}",
                    tags=["t"],
                    model="m",
                )
            )
        await session.commit()
    return tenant.id, key, made


async def test_a_page_of_100_products_is_two_statements(database: Database) -> None:
    tenant_id, key, made = await catalog_of(database, 100)
    gateway = Gateway(database, make_celery_app(Settings()), {})
    app = create_app(gateway)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway"
    ) as client:
        url, headers = f"/v1/tenants/{tenant_id}/products?limit=100", {"X-API-Key": key}
        assert (await client.get(url, headers=headers)).status_code == 200  # the key, cached
        with statements(database) as sent:
            page = await client.get(url, headers=headers)
        one = made[1]
        with statements(database) as sent_for_one:
            single = await client.get(f"/v1/tenants/{tenant_id}/products/{one}", headers=headers)
        past_the_end = await client.get(f"{url}&offset=100", headers=headers)
    assert page.status_code == 200
    assert len(sent) == 2, sent
    body = page.json()
    assert body["total"] == 100
    assert [item["id"] for item in body["items"]] == [str(p) for p in made]
    assert all(
        [v["sku"] for v in item["variants"]] == [f"{i}-A", f"{i}-B"]
        for i, item in enumerate(body["items"])
    )
    assert [item["enrichment"]["state"] for item in body["items"][:4]] == ["done", "pending"] * 2
    assert body["items"][0]["enrichment"] == {"state": "done", "description": "d0", "tags": ["t"]}
    assert single.json() == body["items"][1]
    assert len(sent_for_one) == 2, sent_for_one
    assert past_the_end.json() == {"items": [], "total": 100, "limit": 100, "offset": 100}
