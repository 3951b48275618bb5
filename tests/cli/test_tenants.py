"""``aura tenants`` as an operator runs it: a real process on the run's own PostgreSQL
database and Redis, each column checked against rows made for it, and running it proven
to change nothing (every table and every Redis key the same before and after), to wait on
no one (a write held open meanwhile) and to fail in one line."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from sqlalchemy import insert, text
from sqlalchemy.exc import DBAPIError

from aura.catalog import Enrichment, Import, ImportRecord, Product, Tenant
from aura.cli.tenants import read_only_connection, tenants_command
from aura.config import get_settings, load_settings
from aura.contract import ENRICH_TASK, INGEST_TASK
from aura.db import Database, OutboxMessage
from aura.db.tables import DEAD, REPLAYED, dead_letters
from aura.errors import ConfigurationError
from aura.llm.budgets import TenantBudgets, TokenBudget
from tests.cli.test_cli import run_aura

NOW = datetime.now(UTC)
STAGES = ("queued", "in_flight", "done", "dead_lettered")


def _letter(tenant: uuid.UUID, task: str, message_id: str, **values: Any) -> dict[str, Any]:
    """A DLQ store row, as ``aura dlq`` files one."""
    return {
        "letter_id": uuid.uuid4().hex,
        "source": "/",
        "fate_id": message_id,
        "message_id": message_id,
        "reason": "max_retries_exceeded",
        "fingerprint": uuid.uuid4().hex,
        "status": DEAD,
        "replay_count": 0,
        "kind": "aura",
        "task": task,
        "queue": "realtime_queue",
        "tenant_id": str(tenant),
        "retries": 3,
        "error_type": "LLMTimeoutError",
        "error": "timed out",
        "refusal": "",
        "dead_lettered_at": NOW,
        "filed_at": NOW,
        "record": {},
        "body": b"{}",
        "body_size": 2,
        "properties": {},
    } | values


async def _seed(database: Database) -> tuple[uuid.UUID, uuid.UUID, str]:
    """Two tenants: a busy one with work at every stage, a quiet one with one product
    enriched. Returns their ids and the busy one's in-flight record."""
    busy, quiet = uuid.uuid4(), uuid.uuid4()
    batch = uuid.uuid4()
    records = [f"rec-{uuid.uuid4()}" for _ in range(6)]
    statuses = ["pending", "pending", "pending", "done", "done", "dead_lettered"]
    products = [uuid.uuid4() for _ in range(6)]
    quiet_product = uuid.uuid4()

    def outbox(message_id: str, task: str) -> dict[str, Any]:
        queue = "bulk_queue" if task == INGEST_TASK else "realtime_queue"
        return {"message_id": message_id, "tenant_id": busy, "task": task, "queue": queue} | {
            "args": [],
            "kwargs": {},
        }

    async with database.engine.begin() as c:
        await c.execute(
            insert(Tenant),
            [
                {"id": t, "name": f"{kind}-{t.hex[:8]}"}
                for t, kind in ((busy, "busy"), (quiet, "q"))
            ],
        )
        await c.execute(insert(Import).values(id=batch, tenant_id=busy, accepted=6))
        await c.execute(
            insert(ImportRecord),
            [
                {"message_id": m, "import_id": batch, "tenant_id": busy, "position": i, "status": s}
                for i, (m, s) in enumerate(zip(records, statuses, strict=True))
            ],
        )
        await c.execute(
            insert(Product),
            [{"id": p, "tenant_id": busy, "title": "p"} for p in products]
            + [{"id": quiet_product, "tenant_id": quiet, "title": "p"}],
        )
        await c.execute(
            insert(Enrichment),
            [
                {"product_id": p, "tenant_id": t, "description": "d", "model": "m"}
                for p, t in ((products[0], busy), (products[1], busy), (quiet_product, quiet))
            ],
        )
        await c.execute(  # records 0 and 1 held for fair dispatch; product 2's enrichment
            insert(OutboxMessage),
            [
                outbox(records[0], INGEST_TASK),
                outbox(records[1], INGEST_TASK),
                outbox(f"enrich-{products[2]}", ENRICH_TASK),
            ],
        )
        await c.execute(
            insert(dead_letters),
            [
                _letter(busy, ENRICH_TASK, f"enrich-{products[4]}"),  # dead-lettered
                _letter(busy, ENRICH_TASK, f"enrich-{products[3]}", status=REPLAYED),
                _letter(busy, ENRICH_TASK, f"enrich-{products[5]}", source="elsewhere"),
                _letter(busy, INGEST_TASK, records[5]),  # the dead record, counted once
            ],
        )
    return busy, quiet, records[2]


async def _rows(database: Database) -> dict[str, tuple[int, str]]:
    """Every table's row count and a digest of its rows."""
    async with database.engine.connect() as c:
        tables = (
            await c.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
        ).scalars()
        found = {}
        for table in sorted(tables):
            digest = (
                f"SELECT count(*), md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {table} t"
            )
            count, md5 = (await c.execute(text(digest))).one()
            found[table] = (count, md5 or "")
    return found


async def _keys(client: aioredis.Redis) -> dict[bytes, bytes | None]:
    return {key: await client.dump(key) for key in await client.keys("*")}


@pytest.fixture
async def shared(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_each_column_counts_its_stage_and_reading_changes_nothing(
    pg_database: Database,
    pg_url: str,
    redis_url: str,
    shared: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    busy, quiet, in_flight = await _seed(pg_database)
    budgets = TenantBudgets({str(busy): TokenBudget(1000, 50_000)}, redis=shared)
    await budgets.reserve(str(busy), 120)  # an LLM call of 120 tokens under way
    env = {
        "DATABASE_URL": pg_url,
        "REDIS_URL": redis_url,
        "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//",  # its vhost: "/" (unused)
        "LLM_TENANT_BUDGETS": f"{busy}=1000/50000",
        "LOG_LEVEL": "WARNING",
    }
    tables, keys = await _rows(pg_database), await _keys(shared)

    async with pg_database.engine.connect() as writer:  # a worker's write, not committed yet
        await writer.execute(
            text("UPDATE import_records SET status = 'done' WHERE message_id = :m"),
            {"m": in_flight},
        )
        shown = run_aura("tenants", "--tenant", str(busy), "--json", env=env)
        await writer.rollback()
    assert shown.returncode == 0, shown.stderr
    (row,) = json.loads(shown.stdout)
    assert {stage: row["records"][stage] for stage in STAGES} == dict(
        zip(STAGES, (2, 1, 2, 1), strict=True)
    )
    assert {stage: row["enrichments"][stage] for stage in STAGES} == dict(
        zip(STAGES, (1, 2, 2, 1), strict=True)
    )
    assert {stage: row[stage] for stage in STAGES} == dict(zip(STAGES, (3, 3, 4, 2), strict=True))
    assert row["tokens"] == {
        "budget": True,
        "minute_used": 120,
        "minute_limit": 1000,
        "day_used": 120,
        "day_limit": 50_000,
    }

    for name, value in (env | {"REDIS_URL": "redis://127.0.0.1:1/0"}).items():
        monkeypatch.setenv(name, value)  # again, in this process (no second start-up)
    monkeypatch.delenv("DLQ_DATABASE_URL")  # the store: DATABASE_URL's, as in the process
    get_settings.cache_clear()
    await asyncio.to_thread(tenants_command, tenant=None, top=10_000, as_json=False)
    table = capsys.readouterr()
    lines = table.out.splitlines()
    [busy_line] = [line for line in lines if str(busy) in line]
    [quiet_line] = [line for line in lines if str(quiet) in line]
    assert lines.index(busy_line) < lines.index(quiet_line)  # busiest first
    assert busy_line.split()[2:] == ["3", "3", "4", "2", "unknown"]
    assert quiet_line.split()[2:] == ["0", "0", "1", "0", "unknown"]
    assert "note: tokens unknown: Redis could not tell" in table.err

    assert await _rows(pg_database) == tables  # twice read, nothing changed
    assert await _keys(shared) == keys


def test_an_unreachable_database_is_one_line_naming_it() -> None:
    done = run_aura("tenants", env={"DATABASE_URL": "postgresql://u:pw5678@127.0.0.1:1/x"})
    assert done.returncode == 2
    assert done.stderr.splitlines() == [done.stderr.strip()]  # one line
    assert done.stderr.startswith("aura: cannot use PostgreSQL at postgresql+asyncpg://u:***@")
    assert "pw5678" not in done.stderr
    assert "Traceback" not in done.stderr


def test_a_database_without_the_schema_or_no_database_at_all_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    for url, message in (
        (f"sqlite:///{empty}", "has no platform schema .* run `aura db upgrade` first"),
        (f"sqlite:///{tmp_path / 'none.db'}", "no database at"),
    ):
        monkeypatch.setenv("DATABASE_URL", url)
        get_settings.cache_clear()
        with pytest.raises(ConfigurationError, match=message):
            tenants_command(tenant=None, top=20, as_json=True)
    assert not (tmp_path / "none.db").exists()  # never created by reading


async def test_the_connection_reads_one_snapshot_and_cannot_write(pg_url: str) -> None:
    async with read_only_connection(pg_url, load_settings()) as c:
        assert (await c.execute(text("SHOW transaction_read_only"))).scalar() == "on"
        assert (await c.execute(text("SHOW transaction_isolation"))).scalar() == "repeatable read"
        with pytest.raises(DBAPIError, match="read-only transaction"):
            await c.execute(insert(Tenant).values(id=uuid.uuid4(), name=uuid.uuid4().hex))
