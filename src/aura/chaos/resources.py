"""What a chaos run owns: its own PostgreSQL database, RabbitMQ vhost and Redis server.

A scenario breaks things. It may only break what it made, so every run makes its own:

    resource          made as                                   removed at the end
    PostgreSQL        database ``<configured>_chaos_<token>``   DROP DATABASE ... (FORCE)
                      on the server DATABASE_URL names
    RabbitMQ          vhost ``<configured>_chaos_<token>``      rabbitmqctl delete_vhost
                      on the broker CELERY_BROKER_URL names
    Redis             a private ``redis-server`` on a free      the process is stopped
                      loopback port (never the configured one)
    RabbitMQ node     with ``own_broker``: a ``PrivateRabbitMQ``  the node is killed, its
                      node (the vhost is made there, not on the   directory removed
                      configured broker: an alarm is node-wide);
                      ``own_broker="cluster"``: three clustered
                      nodes (``PrivateRabbitMQCluster``)
    Redis, Sentinel   ``own_redis="sentinel"``: a primary, a      all five are stopped
                      replica and three sentinels of the run's
                      own (``PrivateSentinelRedis``)
    PostgreSQL pair   ``own_database="replicated"``: a primary   both are stopped, their
                      and a streaming replica of the run's own    directories removed
                      (``PrivatePostgres``); the run's database
                      is made there, reached by a multi-host URL
    PostgreSQL roles  a scenario's LOGIN roles (``add_role``),   DROP ROLE, after the
                      on the configured server                    database

They are removed also after Ctrl-C (the run's ``finally``), and a run's leftovers (a
queue that did not drain) can never be counted by the next run. The configured servers
are only connected to: nothing here stops, restarts, flushes or reconfigures them.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import create_async_engine

from aura.chaos.broker_cluster import PrivateRabbitMQCluster
from aura.chaos.broker_node import PrivateRabbitMQ, free_port
from aura.errors import ConfigurationError
from aura.messaging.topology import broker_nodes

__all__ = ["OwnedStack", "PrivateRedis", "owned_stack", "run_tool"]

_NAME_LIMIT = 63  # PostgreSQL's identifier length


def run_tool(*command: str, check: bool = True, timeout: float = 60) -> str:
    """One of the machine's service tools (rabbitmqctl, psql), found on PATH; its output."""
    if shutil.which(command[0]) is None:
        raise ConfigurationError(f"{command[0]} is not installed here: aura chaos needs it")
    done = subprocess.run(  # noqa: S603 - fixed tool names, our own arguments
        list(command), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        error = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ConfigurationError(f"{' '.join(command[:2])} failed: {error[0][:200]}")
    return done.stdout


class PrivateRedis:
    """A ``redis-server`` of the run's own on a free loopback port, so a scenario may stop
    and start it at will (no persistence: a restart loses its state, as a crash does)."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise ConfigurationError(
                "redis-server is not installed here: aura chaos runs a Redis of its own"
            )
        command = [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", ""]
        command += ["--appendonly", "no", "--dir", str(self.directory)]
        # Our own binary and arguments, no shell.
        self.process = subprocess.Popen(  # noqa: S603
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 15
        while not self.answers():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise ConfigurationError(
                    f"the run's redis-server on port {self.port} did not start"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill it (no save, no goodbye: its clients see a dropped connection)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self, down_s: float) -> None:
        self.stop()
        time.sleep(down_s)  # down for a while, as a real restart is
        self.start()
        self.restarts += 1

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as raw:
                raw.sendall(b"PING\r\n")
                return raw.recv(16).startswith(b"+PONG")
        except OSError:
            return False


@dataclass
class OwnedStack:
    """The run's own services (URLs the worker and the run use)."""

    database_url: str
    broker_url: str
    redis: Any  # PrivateRedis, or PrivateSentinelRedis (``own_redis="sentinel"``)
    database: str
    vhost: str
    # The run's own node or cluster (``own_broker``); None: a vhost on the configured one.
    rabbitmq: PrivateRabbitMQ | PrivateRabbitMQCluster | None = None
    postgres: Any = None  # PrivatePostgres (``own_database="replicated"``)
    roles: list[str] = field(default_factory=list)  # dropped at the end (``add_role``)

    @property
    def redis_url(self) -> str:
        return str(self.redis.url)

    @property
    def rabbitmq_node(self) -> str | None:
        """The node ``rabbitmqctl -n`` names for the run's vhost (None: the configured one)."""
        return None if self.rabbitmq is None else self.rabbitmq.node

    def add_role(self, suffix: str) -> str:
        """A name for a role of the run's own, ``<database>_<suffix>``; from now on it is
        dropped at the end of the run (make it after this, so Ctrl-C cannot leave it)."""
        role = self.database[: _NAME_LIMIT - len(suffix) - 1] + f"_{suffix}"
        self.roles.append(role)
        return role


def _owned_name(configured: str, token: str) -> str:
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in configured) or "aura"
    suffix = f"_chaos_{token}"
    return base[: _NAME_LIMIT - len(suffix)] + suffix


def _with_path(url: str, path: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment))


async def _admin_execute(database_url: str, statement: str) -> None:
    """One statement outside a transaction (CREATE / DROP DATABASE need that)."""
    engine = create_async_engine(database_url, isolation_level="AUTOCOMMIT", poolclass=None)
    try:
        async with engine.connect() as connection:
            await connection.execute(text(statement))
    except (OSError, SQLAlchemyError) as exc:
        raise ConfigurationError(
            f"PostgreSQL at DATABASE_URL refused {statement.split()[0]} "
            f"{statement.split()[1]}: {type(exc).__name__}"
        ) from exc
    finally:
        await engine.dispose()


def _broker_parts(broker_url: str) -> tuple[str, str]:
    """(vhost, user) of an amqp:// URL."""
    parts = urlsplit(broker_url)
    return unquote(parts.path.lstrip("/")) or "/", unquote(parts.username or "guest")


def _private_redis(scratch: Path, kind: str) -> Any:
    if kind == "sentinel":
        from aura.chaos.redis_sentinel import PrivateSentinelRedis

        return PrivateSentinelRedis(scratch)
    return PrivateRedis(scratch)


def _private_broker(kind: bool | str) -> PrivateRabbitMQ | PrivateRabbitMQCluster | None:
    if kind == "cluster":
        return PrivateRabbitMQCluster()
    return PrivateRabbitMQ() if kind else None


def _in_vhost(broker_url: str, vhost: str) -> str:
    """``broker_url`` (one URL, or kombu's ``;``-separated failover list) in ``vhost``."""
    path = f"/{quote(vhost, safe='')}"
    return ";".join(_with_path(url, path) for url in broker_nodes(broker_url))


@contextlib.asynccontextmanager
async def owned_stack(
    database_url: str,
    broker_url: str,
    scratch: Path,
    *,
    token: str | None = None,
    own_broker: bool | str = False,
    own_redis: str = "single",
    own_database: str = "shared",
) -> AsyncIterator[OwnedStack]:
    """Make the run's database, vhost and Redis server; remove all three at the end. With
    ``own_broker`` the vhost is on a RabbitMQ node (``"cluster"``: three) the run starts
    and kills at the end; ``own_redis="sentinel"``: Redis is a Sentinel group of its own;
    ``own_database="replicated"``: the database is on a primary + replica of its own."""
    token = token or secrets.token_hex(4)
    configured_db = urlsplit(database_url).path.lstrip("/") or "aura"
    database = _owned_name(configured_db, token)
    configured_vhost, user = _broker_parts(broker_nodes(broker_url)[0])
    vhost = _owned_name("aura" if configured_vhost == "/" else configured_vhost, token)
    redis = _private_redis(scratch, own_redis)
    node = _private_broker(own_broker)
    if node is not None:
        broker_url, user = node.url, "guest"
    postgres = None
    if own_database == "replicated":
        from aura.chaos.pg_node import PrivatePostgres

        scratch.parent.chmod(0o755)  # its servers run as ``postgres``: they pass through
        postgres = PrivatePostgres(scratch.parent / "postgres")
    stack = OwnedStack(
        database_url=_with_path(database_url, f"/{database}")
        if postgres is None
        else postgres.url(database),
        broker_url=_in_vhost(broker_url, vhost),
        redis=redis,
        database=database,
        vhost=vhost,
        rabbitmq=node,
        postgres=postgres,
    )
    made: list[str] = []
    try:
        if postgres is not None:
            postgres.start()
            database_url = postgres.admin_url
        await _admin_execute(database_url, f'CREATE DATABASE "{database}"')
        made.append("database")
        _make_vhost(node, vhost, user, made)
        redis.start()
        yield stack
    finally:
        redis.stop()
        if node is not None:  # the vhost goes with it
            node.stop()
        if postgres is not None:  # the database goes with it
            postgres.stop()
            made = [thing for thing in made if thing != "database"]
        await _remove(made, stack, database_url)


def _make_vhost(
    node: PrivateRabbitMQ | PrivateRabbitMQCluster | None, vhost: str, user: str, made: list[str]
) -> None:
    """Start the run's own node (or cluster) and make the vhost there, or make it on the
    configured broker (then ``made`` says so, from the moment it exists)."""
    if node is not None:
        node.start()
        node.ctl("add_vhost", vhost)
        node.ctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        return
    run_tool("rabbitmqctl", "add_vhost", vhost)
    made.append("vhost")
    run_tool("rabbitmqctl", "set_permissions", "-p", vhost, user, ".*", ".*", ".*")


async def _remove(made: list[str], stack: OwnedStack, admin_url: str) -> None:
    """Remove what the run made on the configured servers, each on its own: one failing
    must not keep the others."""
    if "vhost" in made:
        with contextlib.suppress(ConfigurationError, subprocess.TimeoutExpired):
            run_tool("rabbitmqctl", "delete_vhost", stack.vhost)
    if "database" in made:
        with contextlib.suppress(ConfigurationError):
            await _admin_execute(
                admin_url, f'DROP DATABASE IF EXISTS "{stack.database}" WITH (FORCE)'
            )
    for role in stack.roles:  # after its database: the grants went with it
        with contextlib.suppress(ConfigurationError):
            await _admin_execute(admin_url, f'DROP ROLE IF EXISTS "{role}"')
