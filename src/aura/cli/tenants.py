"""``aura tenants``: each tenant's work, queued, in flight, done and dead-lettered, and the
LLM tokens it has used of its budget; read without changing anything.

    aura tenants [--top N] [--json]       the N busiest tenants (queued + in flight), 20
                                          by default, busiest first
    aura tenants --tenant UUID [--json]   one tenant

A tenant's work is its import records (one ingest each) and its products (one enrichment
each), and every unit is at one stage (``aura.catalog.workload`` defines each exactly):

    queued          its message is in the outbox, not yet published (held there for fair
                    dispatch, or staged by a request and not yet confirmed)
    in flight       published, not finished: in the broker's queue, running, retrying or
                    deferred (pending records not in the outbox; products with no
                    enrichment that are neither queued nor dead-lettered)
    done            import records done, products enriched
    dead-lettered   import records dead-lettered, and the tenant's enrichment letters in
                    the DLQ store not replayed (what ``aura dlq`` has filed)
    tokens          LLM tokens used in the sliding day (and minute) of its budget, from
                    Redis (``aura.llm.budgets``); "-" without a budget, "unknown" when
                    Redis cannot tell

It only reads, and nothing waits on it: PostgreSQL in one transaction that is READ ONLY
(the session's default too) and REPEATABLE READ (every number from one snapshot), no row
locks, each statement bounded (``statement_timeout``, ``lock_timeout``); SQLite opened
read-only; Redis read by a script that writes nothing. A database that cannot be reached
is one line naming it (exit 2), one without the platform's tables says to run ``aura db
upgrade``; a Redis that cannot help leaves the tokens "unknown" and says why.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from aura.cli import app
from aura.cli.dlq import literal
from aura.errors import ConfigurationError, InvalidInputError, NotFoundError

__all__ = ["read_only_connection", "tenants_command"]

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    from aura.catalog.workload import TenantWork
    from aura.config import Settings

_TOP_MAX = 10_000
# The session's own bounds: a count never runs away, never queues behind a DDL lock for
# long, and a stalled command cannot hold its snapshot open (it would hold back VACUUM).
_SERVER_SETTINGS = {
    "application_name": "aura tenants",
    "default_transaction_read_only": "on",
    "statement_timeout": "30s",
    "lock_timeout": "2s",
    "idle_in_transaction_session_timeout": "60s",
}
_REDIS_TIMEOUT = 10.0


def _read_only_engine(url: str, settings: Settings) -> AsyncEngine:
    """An engine on ``url`` whose sessions cannot write (SQLite: opened read-only, and a
    missing file is refused, never created)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        connect_args = {"timeout": settings.db_connect_timeout, "server_settings": _SERVER_SETTINGS}
        return create_async_engine(url, poolclass=NullPool, connect_args=connect_args)
    path = Path(parsed.database or "")
    if not parsed.database or not path.is_file():
        raise ConfigurationError(
            f"no database at {path}: set DATABASE_URL, or `aura db upgrade` makes one"
        )
    from urllib.parse import quote

    located = quote(str(path.resolve()))
    return create_async_engine(
        f"sqlite+aiosqlite:///file:{located}?mode=ro&uri=true", poolclass=NullPool
    )


@asynccontextmanager
async def read_only_connection(url: str, settings: Settings) -> AsyncIterator[AsyncConnection]:
    """A connection to ``url`` that cannot write: on PostgreSQL one READ ONLY, REPEATABLE
    READ transaction (one snapshot; rolled back at the end); SQLite opened read-only."""
    engine = _read_only_engine(url, settings)
    try:
        async with engine.connect() as connection:
            if engine.dialect.name == "postgresql":
                connection = await connection.execution_options(
                    isolation_level="REPEATABLE READ", postgresql_readonly=True
                )
            try:
                yield connection
            finally:
                await connection.rollback()
    finally:
        await engine.dispose()


async def _tables(connection: AsyncConnection) -> set[str]:
    from sqlalchemy import inspect

    return await connection.run_sync(lambda sync: set(inspect(sync).get_table_names()))


async def _dead_enrichments(
    connection: AsyncConnection, settings: Settings, tenant_ids: list[uuid.UUID] | None
) -> dict[str, int]:
    """The DLQ store's enrichment letters by tenant (none filed yet: no table, none)."""
    from aura.catalog.workload import dead_enrichments
    from aura.db.tables import DEAD_LETTERS_TABLE

    if DEAD_LETTERS_TABLE not in await _tables(connection):
        return {}
    return await dead_enrichments(connection, _dlq_source(settings), tenant_ids)


def _dlq_source(settings: Settings) -> str | None:
    """What the DLQ store calls this broker (its vhost, as ``aura dlq`` files it); None:
    every broker's letters."""
    broker = settings.celery_broker_url
    if broker is None or broker.startswith("memory"):
        return None
    from kombu.utils.url import parse_url

    first = broker.split(";")[0]  # kombu's failover list: one broker, one vhost
    return str(parse_url(first).get("virtual_host") or "/")


async def _store_letters(
    settings: Settings, store: str, tenant_ids: list[uuid.UUID] | None
) -> dict[str, int]:
    """The letters from a DLQ store of its own (DLQ_DATABASE_URL): failing, one line."""
    from aura.config import mask_url
    from aura.errors import ServiceUnavailableError
    from aura.logs import describe_exception

    try:
        async with read_only_connection(store, settings) as connection:
            return await _dead_enrichments(connection, settings, tenant_ids)
    except ConfigurationError:
        return {}  # no store file yet: nothing was ever filed there
    except Exception as exc:
        raise ServiceUnavailableError(
            f"the DLQ store at {mask_url(store)} cannot be read: {describe_exception(exc)}"
        ) from exc


async def _read_work(settings: Settings, tenant_id: uuid.UUID | None) -> list[TenantWork]:
    """Every tenant's work (or ``tenant_id``'s), in one snapshot of the catalog."""
    from aura.catalog.workload import REQUIRED_TABLES, tenant_work
    from aura.config import mask_url
    from aura.db import database_url

    url = database_url(settings)
    store = settings.dlq_database_url or url
    ids = None if tenant_id is None else [tenant_id]
    letters = None if store == url else await _store_letters(settings, store, ids)
    async with read_only_connection(url, settings) as connection:
        missing = sorted(set(REQUIRED_TABLES) - await _tables(connection))
        if missing:
            raise ConfigurationError(
                f"the database at {mask_url(url)} has no platform schema (no table "
                f"{', '.join(missing)}): run `aura db upgrade` first"
            )
        if letters is None:
            letters = await _dead_enrichments(connection, settings, ids)
        return await tenant_work(connection, ids, letters)


def _budgeted(settings: Settings, tenant_ids: list[str]) -> list[str]:
    """The tenants with a token budget: their own (LLM_TENANT_BUDGETS), else the default
    (LLM_TENANT_BUDGET_DEFAULT), as ``TenantBudgets.budget_for`` decides."""
    try:
        from aura.budget_settings import canonical_tenant, parse_tenant_budgets, parse_token_budget
    except ImportError:  # an Aura without tenants' budgets: no tenant has one
        return []
    default = parse_token_budget(settings.llm_tenant_budget_default)
    own = parse_tenant_budgets(settings.llm_tenant_budgets)
    return [t for t in tenant_ids if own.get(canonical_tenant(t), default) is not None]


async def _token_usage(
    settings: Settings, tenant_ids: list[str]
) -> tuple[dict[str, dict[str, Any]] | None, str | None]:
    """Each tenant's LLM tokens used and limits (``aura.llm.budgets``), ``{"budget":
    False}`` for one without a budget; or None and why they are unknown. The one place the
    tokens column is read; nothing is asked of Redis (nor the LLM layer loaded) when no
    tenant shown has a budget."""
    budgeted = _budgeted(settings, tenant_ids)
    unbudgeted: dict[str, dict[str, Any]] = {t: {"budget": False} for t in tenant_ids}
    if not budgeted:
        return unbudgeted, None
    if settings.redis_url is None:
        return None, "REDIS_URL is unset: each worker keeps its budgets in its own process"
    from aura.cli.failures import CONNECT_TIMEOUT
    from aura.llm.budgets import TenantBudgets
    from aura.logs import describe_exception
    from aura.redis_connect import async_redis

    redis = async_redis(
        settings.redis_url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=5
    )
    try:
        async with asyncio.timeout(_REDIS_TIMEOUT):
            usage = await TenantBudgets.from_settings(settings, redis=redis).usage(budgeted)
    except Exception as exc:  # any failure of Redis's: the counts stand, tokens unknown
        return None, f"Redis could not tell ({describe_exception(exc)})"
    finally:
        await redis.aclose()
    fields = ("minute_used", "minute_limit", "day_used", "day_limit")
    known = {
        t: {"budget": True} | {f: getattr(used, f) for f in fields} for t, used in usage.items()
    }
    return unbudgeted | known, None


def _tenant_id(text: str | None) -> uuid.UUID | None:
    if text is None:
        return None
    try:
        return uuid.UUID(text)
    except ValueError:
        raise InvalidInputError(
            f"--tenant takes a tenant id (a UUID), got {literal(text[:60])!r}", field="tenant"
        ) from None


def _row(work: TenantWork, tokens: dict[str, Any] | None) -> dict[str, Any]:
    total = work.total
    stages = ("queued", "in_flight", "done", "dead_lettered")
    return {
        "tenant_id": str(work.tenant_id),
        "name": work.name,
        **{stage: getattr(total, stage) for stage in stages},
        "records": {stage: getattr(work.records, stage) for stage in stages},
        "enrichments": {stage: getattr(work.enrichments, stage) for stage in stages},
        "tokens": tokens,
    }


def _tokens_cell(tokens: dict[str, Any] | None) -> str:
    if tokens is None:
        return "unknown"
    limited = [w for w in ("day", "minute") if tokens.get(f"{w}_limit") is not None]
    if not tokens.get("budget") or not limited:
        return "-"
    return ", ".join(f"{tokens[f'{w}_used']}/{tokens[f'{w}_limit']} a {w}" for w in limited)


def _fit(text: str, width: int) -> str:
    text = literal(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(rows: list[dict[str, Any]]) -> list[str]:
    head = f"{'TENANT':<24} {'ID':<36} {'QUEUED':>9} {'IN FLIGHT':>9} {'DONE':>9} {'DEAD':>7}"
    lines = [f"{head}  TOKENS"]
    for row in rows:
        lines.append(
            f"{_fit(row['name'], 24):<24} {row['tenant_id']:<36} {row['queued']:>9} "
            f"{row['in_flight']:>9} {row['done']:>9} {row['dead_lettered']:>7}  "
            f"{_tokens_cell(row['tokens'])}"
        )
    return lines


@app.command("tenants")
def tenants_command(
    tenant: str | None = typer.Option(None, "--tenant", help="Only this tenant (its id)."),
    top: int = typer.Option(
        20, "--top", min=1, max=_TOP_MAX, help="Show the N busiest tenants (queued + in flight)."
    ),
    as_json: bool = typer.Option(False, "--json", help="A JSON list, one object per tenant."),
) -> None:
    """Each tenant's work (queued, in flight, done, dead-lettered) and LLM tokens used of
    its budget; reads only."""
    from aura.config import get_settings

    settings = get_settings()
    wanted = _tenant_id(tenant)
    found = asyncio.run(_read_work(settings, wanted))
    if wanted is not None and not found:
        raise NotFoundError(f"no tenant {wanted}", field="tenant")
    busiest = sorted(found, key=lambda w: (-w.total.busy, -w.total.dead_lettered, w.name))
    shown = busiest[:top]
    tokens, why = asyncio.run(_token_usage(settings, [str(w.tenant_id) for w in shown]))
    rows = [_row(w, None if tokens is None else tokens.get(str(w.tenant_id))) for w in shown]
    if why is not None:
        typer.echo(f"note: tokens unknown: {why}", err=True)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no tenants (`aura tenant create NAME` makes one)")
        return
    for line in _table(rows):
        typer.echo(line)
    typer.echo(
        f"{len(rows)} of {len(found)} tenant(s), busiest first (queued + in flight); records "
        "and enrichments together (--json: each kind)"
    )
