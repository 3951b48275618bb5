"""Where the test suite finds the real services, and how it gives itself a clean slate.

Each run uses its own PostgreSQL database, Redis and RabbitMQ vhost, created at the start
of the run and removed at its end, so runs never see each other's data and nothing a test
leaves behind survives it. The names are unique per run unless the caller sets them
(``AURA_TEST_PG_DATABASE``, ``AURA_TEST_AMQP_VHOST``, ``AURA_TEST_REDIS_URL``): two suites
on one machine never collide. Without ``AURA_TEST_REDIS_URL`` the run starts a
``redis-server`` of its own on a free loopback port (``OwnRedis``) and stops it at the end.

Nothing here stops, restarts, flushes or reconfigures a server the run did not start:
the only Redis it flushes is its own db number (or its own server), and
``MachineRedis`` lets the suite prove the machine's Redis was left alone.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from aura.chaos.resources import PrivateRedis

# One token per test run: the default names below are this run's alone.
RUN_TOKEN = secrets.token_hex(4)
PG_ADMIN_DSN = os.environ.get("AURA_TEST_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/test")
PG_TEST_DATABASE = os.environ.get("AURA_TEST_PG_DATABASE") or f"aura_test_{RUN_TOKEN}"
# None: the run starts a redis-server of its own (conftest's ``redis_url``).
REDIS_TEST_URL = os.environ.get("AURA_TEST_REDIS_URL") or None
AMQP_HOST = os.environ.get("AURA_TEST_AMQP_HOST", "127.0.0.1:5672")
AMQP_TEST_VHOST = os.environ.get("AURA_TEST_AMQP_VHOST") or f"aura_test_{RUN_TOKEN}"
# The machine's own Redis, which the suite must leave exactly as it found it.
MACHINE_REDIS = os.environ.get("AURA_TEST_MACHINE_REDIS", "127.0.0.1:6379")


def pg_test_url(driver: str = "postgresql+asyncpg") -> str:
    host_part = PG_ADMIN_DSN.split("://", 1)[1].rsplit("/", 1)[0]
    return f"{driver}://{host_part}/{PG_TEST_DATABASE}"


def amqp_test_url() -> str:
    return f"amqp://guest:guest@{AMQP_HOST}/{AMQP_TEST_VHOST}"


async def recreate_pg_database() -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{PG_TEST_DATABASE}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{PG_TEST_DATABASE}"')
    finally:
        await conn.close()


async def drop_pg_database() -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{PG_TEST_DATABASE}" WITH (FORCE)')
    finally:
        await conn.close()


def rabbitmqctl(*args: str) -> str:
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        raise RuntimeError("rabbitmqctl not found: the tests manage their RabbitMQ vhost with it")
    done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def recreate_amqp_vhost() -> None:
    delete_amqp_vhost()
    rabbitmqctl("add_vhost", AMQP_TEST_VHOST)
    rabbitmqctl("set_permissions", "-p", AMQP_TEST_VHOST, "guest", ".*", ".*", ".*")


def delete_amqp_vhost() -> None:
    if AMQP_TEST_VHOST in list_vhosts():
        rabbitmqctl("delete_vhost", AMQP_TEST_VHOST)


def list_vhosts() -> list[str]:
    return rabbitmqctl("list_vhosts", "--quiet", "--no-table-headers").split()


@dataclass(frozen=True)
class RedisIdentity:
    """Who a Redis server is: a restart changes ``run_id`` and resets ``uptime_s``."""

    run_id: str
    uptime_s: int

    @classmethod
    def of(cls, address: str = MACHINE_REDIS) -> RedisIdentity | None:
        """The server at ``host:port`` (None when nothing answers there)."""
        import redis

        host, _, port = address.rpartition(":")
        client = redis.Redis(host=host, port=int(port), socket_connect_timeout=2)
        try:
            info = client.info("server")
        except redis.RedisError:
            return None
        finally:
            client.close()
        return cls(str(info["run_id"]), int(info["uptime_in_seconds"]))

    def still_running(self, later: RedisIdentity | None, elapsed_s: float) -> bool:
        """``later`` is this same server, never restarted in between."""
        return (
            later is not None
            and later.run_id == self.run_id
            and later.uptime_s >= self.uptime_s + int(elapsed_s) - 1
        )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class OwnRedis(PrivateRedis):
    """A redis-server this test run starts on a free loopback port, and so may stop and
    start again at will (never the machine's server: other people's data lives there).
    It is ``aura chaos``'s own ``PrivateRedis``."""

    def __init__(self, directory: str) -> None:
        super().__init__(Path(directory))
