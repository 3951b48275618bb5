"""Fixtures: the real services, each clean for this run, and a clean environment."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from aura.catalog import upgrade
from aura.chaos.broker_node import PrivateRabbitMQ
from aura.config import get_settings
from aura.db import Database
from tests import services

_AURA_VARIABLES = (
    "DB_",
    "CELERY_",
    "RETRY_TRACKER_",
    "CIRCUIT_BREAKER_",
    "DATABASE_URL",
    "REDIS_URL",
    "LLM_",
    "LOG_",
    "DLQ_",
)


@pytest.fixture(scope="session", autouse=True)
def dlq_store_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The run's own DLQ store (SQLite in the run's temporary directory): a test that
    reads the DLQ without naming a store never writes the embedded ``.aura/`` file. Set
    for the whole session, so the environment a module's worker or CLI copies has it."""
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('dlq-store') / 'dlq.db'}"
    previous = os.environ.get("DLQ_DATABASE_URL")
    os.environ["DLQ_DATABASE_URL"] = url
    yield url
    if previous is None:
        os.environ.pop("DLQ_DATABASE_URL", None)
    else:
        os.environ["DLQ_DATABASE_URL"] = previous


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, dlq_store_url: str) -> Iterator[None]:
    """Each test starts from the seed's defaults, whatever the caller's shell exported."""
    for name in list(os.environ):
        if name.upper().startswith(_AURA_VARIABLES):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DLQ_DATABASE_URL", dlq_store_url)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(scope="session")
async def pg_url() -> AsyncIterator[str]:
    """SQLAlchemy URL of this run's own PostgreSQL database (dropped at the end)."""
    try:
        await services.recreate_pg_database()
    except (OSError, Exception) as exc:
        pytest.fail(f"PostgreSQL at {services.PG_ADMIN_DSN} is not usable: {exc}", pytrace=False)
    yield services.pg_test_url()
    await services.drop_pg_database()


@pytest.fixture(scope="session", autouse=True)
def machine_redis_untouched() -> Iterator[None]:
    """The machine's Redis is other people's: the run must not restart (or stop) it."""
    before = services.RedisIdentity.of()
    started = time.monotonic()
    yield
    if before is None:  # nothing answered there at the start: nothing to protect
        return
    after = services.RedisIdentity.of()
    if not before.still_running(after, time.monotonic() - started):
        pytest.fail(
            f"the machine's Redis at {services.MACHINE_REDIS} was restarted or stopped "
            f"during the run: before {before}, after {after}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
async def redis_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """URL of this run's own Redis: a redis-server the run starts on a free port (stopped
    at the end), or the db number AURA_TEST_REDIS_URL names (flushed at the start and the
    end: only that db, never the server)."""
    if services.REDIS_TEST_URL is None:
        own = services.OwnRedis(str(tmp_path_factory.mktemp("own-redis")))
        try:
            own.start()
        except RuntimeError as exc:
            pytest.fail(str(exc), pytrace=False)
        try:
            yield own.url
        finally:
            own.stop()
        return
    client = aioredis.from_url(services.REDIS_TEST_URL)
    try:
        await client.flushdb()
    except Exception as exc:
        pytest.fail(f"Redis at {services.REDIS_TEST_URL} is not usable: {exc}", pytrace=False)
    finally:
        await client.aclose()
    yield services.REDIS_TEST_URL
    client = aioredis.from_url(services.REDIS_TEST_URL)
    await client.flushdb()
    await client.aclose()


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """URL of this run's own RabbitMQ vhost (recreated at the start, deleted at the end)."""
    try:
        services.recreate_amqp_vhost()
    except Exception as exc:
        pytest.fail(f"RabbitMQ vhost {services.AMQP_TEST_VHOST!r}: {exc}", pytrace=False)
    yield services.amqp_test_url()
    services.delete_amqp_vhost()


@pytest.fixture(scope="session")
async def pg_database(pg_url: str) -> AsyncIterator[Database]:
    """This run's PostgreSQL database, migrated to head."""
    database = Database(pg_url, pool_size=5, max_overflow=5)
    await upgrade(database)
    yield database
    await database.dispose()


@pytest.fixture(scope="session")
async def sqlite_database(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Database]:
    """An embedded SQLite database file, migrated to head."""
    path = tmp_path_factory.mktemp("sqlite") / "aura.db"
    database = Database(f"sqlite+aiosqlite:///{path}")
    await upgrade(database)
    yield database
    await database.dispose()


@pytest.fixture(params=["postgresql", "sqlite"])
def database(request: pytest.FixtureRequest) -> Database:
    """Each behaviour test runs on real PostgreSQL and on the embedded SQLite."""
    fixture = "pg_database" if request.param == "postgresql" else "sqlite_database"
    found: Database = request.getfixturevalue(fixture)
    return found


@pytest.fixture(scope="session")
def rabbit() -> Iterator[PrivateRabbitMQ]:
    """A RabbitMQ node of the run's own (``aura.chaos.broker_node.PrivateRabbitMQ``), for
    the tests that must break a broker (a memory alarm is node-wide: never the machine's)."""
    from aura.errors import ConfigurationError

    node = PrivateRabbitMQ()
    try:
        node.start()
    except ConfigurationError as exc:
        pytest.fail(f"a private RabbitMQ node did not start: {exc}", pytrace=False)
    try:
        yield node
    finally:
        node.stop()
