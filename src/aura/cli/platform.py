"""``aura gateway``, ``aura worker`` and ``aura tenant create``: running the platform."""

from __future__ import annotations

import asyncio
from typing import Any

import typer

from aura.cli import app
from aura.cli.extras import needs_extra, with_extra
from aura.contract import PLATFORM_QUEUES
from aura.errors import ConfigurationError, InvalidInputError

__all__ = ["gateway_command", "outbox_relay", "tenant_create", "worker_command"]

tenant_app = typer.Typer(
    help=with_extra("Tenants and their API keys.", "gateway"), no_args_is_help=True
)
app.add_typer(tenant_app, name="tenant")


@tenant_app.command("create")
@needs_extra("gateway")
def tenant_create(name: str = typer.Argument(..., help="The tenant's unique name.")) -> None:
    """Create a tenant and print its API key (shown once; only its hash is stored)."""
    from aura.catalog import upgrade
    from aura.config import get_settings
    from aura.db import Database
    from aura.gateway.auth import create_tenant_with_key

    async def create() -> tuple[str, str]:
        database = Database.from_settings(get_settings())
        try:
            await upgrade(database)
            async with database.session() as session:
                tenant, key = await create_tenant_with_key(session, name)
                await session.commit()
            return str(tenant.id), key
        finally:
            await database.dispose()

    tenant_id, key = asyncio.run(create())
    typer.echo(f"tenant {name!r} created: id {tenant_id}")
    typer.echo(f"API key (shown once, send it as X-API-Key): {key}")


@app.command("gateway")
@needs_extra("gateway")
def gateway_command(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port to listen on."),
) -> None:
    """Serve the API gateway (uvicorn). Needs RabbitMQ (CELERY_BROKER_URL) and workers on
    it: without them, imports would wait on an in-process broker no worker can reach.
    `aura demo` runs an embedded gateway with its own worker."""
    from aura.cli.failures import check_broker, check_database
    from aura.config import get_settings

    settings = get_settings()
    broker = settings.celery_broker_url
    if broker is None or broker.startswith("memory"):
        raise ConfigurationError(
            "aura gateway needs CELERY_BROKER_URL (RabbitMQ, where its workers listen): "
            f"it is {'unset' if broker is None else broker}, so nothing it accepted would "
            "ever be processed; `aura demo` runs the embedded gateway with its own worker"
        )
    check_broker(broker)  # first: a service that is down is one line in 2 s
    asyncio.run(check_database(settings))
    from aura.gateway import create_app
    from aura.gateway.server import serve

    serve(create_app(), host=host, port=port, settings=settings)


@app.command("worker")
def worker_command(
    queues: str = typer.Option(
        ",".join(PLATFORM_QUEUES), help="Comma-separated queues to consume."
    ),
    pool: str = typer.Option(
        "", help="async (many tasks per process; default: WORKER_POOL) or prefork."
    ),
    concurrency: int = typer.Option(
        0,
        min=0,
        max=2000,
        help="Tasks in flight per process (async) or child processes (prefork); "
        "default WORKER_CONCURRENCY (async) or 2 (prefork).",
    ),
    processes: int = typer.Option(
        1, min=1, max=64, help="Worker processes on this node, restarted when they exit."
    ),
    hostname: str = typer.Option(
        "", help="Celery node name (default celery@%h; with --processes: auraN@%h each)."
    ),
    restart: bool = typer.Option(
        True,
        "--restart/--no-restart",
        help="Restart a worker process that exits (a crash, a recycle); --no-restart when "
        "something else (systemd, Kubernetes) already does.",
    ),
) -> None:
    """Run the intelligence worker (async pool by default: hundreds of LLM calls in
    flight per process; --processes to use every core; a process that exits is
    restarted unless --no-restart)."""
    chosen = _chosen_queues(queues)
    from aura.config import get_settings

    settings = get_settings()
    if settings.celery_broker_url is None:
        raise ConfigurationError("CELERY_BROKER_URL must be set to run a worker")
    pool = pool or settings.worker_pool
    if pool not in ("async", "prefork"):
        raise InvalidInputError(f"--pool takes async or prefork, got {pool!r}", field="pool")
    if not concurrency:
        concurrency = settings.worker_concurrency if pool == "async" else 2
    if processes > 1 or restart:
        raise typer.Exit(_supervise(chosen, pool, concurrency, processes, settings, hostname))
    _run_here(chosen, pool, concurrency, hostname)


def _chosen_queues(queues: str) -> list[str]:
    """The queues ``--queues`` names (comma-separated), each one of the platform's."""
    chosen = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = set(chosen) - set(PLATFORM_QUEUES)
    if not chosen or unknown:
        raise InvalidInputError(
            f"--queues takes {' and/or '.join(PLATFORM_QUEUES)}, got {queues!r}", field="queues"
        )
    return chosen


def _run_here(queues: list[str], pool: str, concurrency: int, hostname: str) -> None:
    """One worker in this process, until it stops (an unclean stop exits non-zero)."""
    from aura.worker.celery_app import ASYNC_POOL
    from aura.worker.process import run_worker
    from aura.worker.tasks import ingest_product

    celery = ingest_product.app
    celery.conf.worker_pool = ASYNC_POOL if pool == "async" else "prefork"
    status = run_worker(
        celery,
        [
            f"--concurrency={concurrency}",
            f"--queues={','.join(queues)}",
            "--without-gossip",
            "--without-mingle",
            "--loglevel=WARNING",
            *([f"--hostname={hostname}"] if hostname else []),
        ],
    )
    if status != 0:  # a supervisor must see an unclean stop as one
        typer.echo(f"aura worker: stopped with status {status} (see the log above)", err=True)
        raise typer.Exit(status)


def _supervise(
    queues: list[str], pool: str, concurrency: int, processes: int, settings: Any, hostname: str
) -> int:
    """``processes`` single-process workers under a supervisor that restarts one that
    exits; with several, /metrics is served here."""
    import os
    import sys

    from aura.worker.supervisor import Supervisor

    command = [sys.executable, "-m", "aura", "worker", "--queues", ",".join(queues)]
    command += ["--pool", pool, "--concurrency", str(concurrency), "--processes", "1"]
    command += ["--no-restart"]
    if processes == 1:  # one process: its own endpoint and node name, as without us
        per_one = ["--hostname", hostname] if hostname else []
        return Supervisor(command, dict(os.environ), 1, per_process=lambda _: per_one).run()
    env = {**os.environ, "WORKER_METRICS_PORT": "0"}  # one endpoint for the node: ours
    if settings.worker_metrics_port:
        from prometheus_client import start_http_server

        from aura.metrics import exposition_registry

        start_http_server(settings.worker_metrics_port, registry=exposition_registry())
    # Each process its own node name: on one name they collide on Celery's exclusive
    # pidbox queue (RESOURCE_LOCKED) and all but one exit.
    return Supervisor(
        command, env, processes, per_process=lambda i: ["--hostname", f"aura{i + 1}@%h"]
    ).run()


outbox_app = typer.Typer(
    help=with_extra("The gateway's outbox of unpublished messages.", "gateway"),
    no_args_is_help=True,
)
app.add_typer(outbox_app, name="outbox")


@outbox_app.command("relay")
@needs_extra("gateway")
def outbox_relay(
    min_age: float = typer.Option(
        0.0, min=0.0, help="Only messages staged at least this many seconds ago."
    ),
) -> None:
    """Publish what the outbox holds (the gateway also does this on its own, every
    OUTBOX_RELAY_INTERVAL seconds) and print how many messages were sent and are left.
    Imports held for fair dispatch get one fair round (as deep as OUTBOX_DISPATCH_DEPTH
    lets the queues be); the gateways' dispatchers release the rest."""
    from aura.cli.failures import check_broker
    from aura.config import get_settings

    settings = get_settings()
    if settings.celery_broker_url is None or settings.celery_broker_url.startswith("memory"):
        raise ConfigurationError("CELERY_BROKER_URL must point at RabbitMQ to relay the outbox")
    check_broker(settings.celery_broker_url)  # first: a broker that is down is one line in 2 s
    from sqlalchemy import func, select

    from aura.tracing import configure_tracing

    configure_tracing("aura-relay")  # its publish spans join the staging requests' traces

    from aura.contract import BULK_QUEUE, REALTIME_QUEUE
    from aura.db import Database, OutboxMessage
    from aura.gateway.dispatch import Dispatcher
    from aura.gateway.outbox import relay_once
    from aura.gateway.senders import CelerySender
    from aura.worker.celery_app import make_celery_app

    async def relay() -> tuple[int, int]:
        database = Database.from_settings(settings)
        publisher = make_celery_app(settings)
        sent = 0
        try:
            while batch := await relay_once(database, publisher, min_age=min_age):
                sent += batch
            sent += await Dispatcher(
                database,
                CelerySender(publisher),
                depth=settings.outbox_dispatch_depth,
                weights=settings.weights_by_tenant,
                feeds={BULK_QUEUE: REALTIME_QUEUE},
            ).dispatch_once()
            async with database.session() as session:
                left = await session.scalar(select(func.count()).select_from(OutboxMessage))
            return sent, int(left or 0)
        finally:
            await database.dispose()

    sent, left = asyncio.run(relay())
    typer.echo(f"outbox: {sent} published, {left} left")
