"""PostgreSQL failover on a primary and a streaming replica of the test's own
(``aura.chaos.pg_node.PrivatePostgres``), reached through one multi-host URL
(``?host=a:p&host=b:p&target_session_attrs=read-write``): the pool follows the promoted
replica, a transaction cut by the crash is rolled back and counted, the inbox never
doubles work across the failover, and what each replication mode keeps of an
acknowledged COMMIT."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

from aura.catalog import upgrade
from aura.chaos.pg_node import PrivatePostgres
from aura.db import (
    Database,
    DatabaseTransactionError,
    claim_message,
    is_network_error,
    is_outage,
    transactional,
)
from aura.db._engine import CHECKOUT_BOUND
from aura.errors import ServiceUnavailableError, cause_chain
from tests.helpers import metric

pytestmark = [pytest.mark.services, pytest.mark.timeout(60)]

MakeCluster = Callable[..., PrivatePostgres]


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[MakeCluster]:
    """Started clusters of the test's own, stopped at its end however it ends."""
    made: list[PrivatePostgres] = []

    def make(*, synchronous: bool = False) -> PrivatePostgres:
        cluster = PrivatePostgres(tmp_path / f"pg-{len(made)}", synchronous=synchronous)
        made.append(cluster)
        cluster.start()
        cluster.sql(cluster.primary_port, "CREATE DATABASE aura")
        return cluster

    yield make
    for cluster in made:
        cluster.stop()


@pytest.fixture
async def opened() -> AsyncIterator[Callable[[PrivatePostgres], Database]]:
    databases: list[Database] = []

    def open_on(cluster: PrivatePostgres) -> Database:
        database = Database(cluster.url("aura"), pool_size=4, max_overflow=4, connect_timeout=3)
        databases.append(database)
        return database

    yield open_on
    for database in databases:
        await database.dispose()


async def migrated(cluster: PrivatePostgres, database: Database) -> Database:
    """The schema, and the replica past it: a standby still replaying CREATE DATABASE
    (seconds on a loaded machine) refuses a connection with "database does not exist",
    and asyncpg then tries no further host."""
    await upgrade(database)
    async with database.engine.begin() as connection:  # no key: a doubled effect shows
        await connection.execute(text("CREATE TABLE effects (message_id text NOT NULL)"))
    await asyncio.to_thread(cluster.wait_replicated)
    return database


@transactional
async def run_once(session: AsyncSession, message_id: str) -> bool:
    """A delivery's work: the inbox claim and the effect, one transaction."""
    claimed = await claim_message(session, message_id, task="failover")
    if claimed:
        await session.execute(text("INSERT INTO effects VALUES (:id)"), {"id": message_id})
    return claimed


async def deliver(database: Database, message_id: str, within: float = 20.0) -> bool:
    """As the broker does: delivered again while the database is out or the COMMIT's
    outcome is unknown, until its fate is settled (bounded)."""
    deadline = time.monotonic() + within
    while True:
        try:
            async with database.session() as session:
                return await run_once(session, message_id)
        except Exception as exc:
            transient = isinstance(exc, DatabaseTransactionError) or is_outage(exc)
            if not transient or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)  # a redelivery's pause, not a synchronisation


async def effects(database: Database) -> dict[str, int]:
    async with database.reader.connect() as connection:
        rows = await connection.execute(
            text("SELECT message_id, count(*) FROM effects GROUP BY message_id")
        )
        return {str(row[0]): int(row[1]) for row in rows}


async def served_by(database: Database) -> int:
    async with database.reader.connect() as connection:
        return int((await connection.execute(text("SELECT inet_server_port()"))).scalar_one())


async def test_a_multi_host_url_follows_the_promoted_replica(
    make_cluster: MakeCluster, opened: Callable[[PrivatePostgres], Database]
) -> None:
    cluster = make_cluster()
    database = await migrated(cluster, opened(cluster))
    assert await deliver(database, "before-the-crash")
    assert await served_by(database) == cluster.primary_port
    before = metric("database_transaction_rollbacks_total", reason="network_error")

    @transactional
    async def cut_by_the_crash(session: AsyncSession) -> None:
        await claim_message(session, "in-flight", task="failover")
        await asyncio.to_thread(cluster.crash_primary)
        await session.execute(text("INSERT INTO effects VALUES ('in-flight')"))

    async with database.session() as session:
        with pytest.raises(DatabaseTransactionError):
            await cut_by_the_crash(session)
    assert metric("database_transaction_rollbacks_total", reason="network_error") == before + 1

    await asyncio.to_thread(cluster.promote_replica)
    # the pooled connections to the dead primary are discarded; the next one is the new's
    assert await deliver(database, "after-the-promotion", within=10.0)
    assert await served_by(database) == cluster.replica_port
    assert await effects(database) == {"before-the-crash": 1, "after-the-promotion": 1}
    assert await deliver(database, "in-flight")  # rolled back: its redelivery runs it


async def test_no_host_taking_writes_is_an_outage(
    make_cluster: MakeCluster, opened: Callable[[PrivatePostgres], Database]
) -> None:
    """Every host answers and none is a primary (mid-failover, the old primary back as a
    standby): asyncpg's TargetServerAttributeNotMatched, held as an outage like a refusal
    (not a bug to retry against), and a clean error from the migrations."""
    cluster = make_cluster()
    standby = f"host=127.0.0.1:{cluster.replica_port}"
    url = f"postgresql+asyncpg://postgres@/postgres?{standby}&{standby}"
    database = Database(f"{url}&target_session_attrs=read-write", connect_timeout=3)
    try:
        with pytest.raises(sa_exc.InternalError, match="None of the hosts") as caught:
            async with database.engine.connect():
                pass
        chain = {type(link).__name__ for link in cause_chain(caught.value)}
        assert "TargetServerAttributeNotMatched" in chain
        assert is_outage(caught.value)
        assert is_network_error(caught.value)
        with pytest.raises(ServiceUnavailableError, match="cannot reach PostgreSQL"):
            await upgrade(database)
    finally:
        await database.dispose()


async def test_a_host_that_never_answers_is_passed_over_within_the_checkout_bound(
    pg_url: str,
) -> None:
    """A first host that accepts and never answers (as a dead machine's address drops
    packets): asyncpg alone spent the whole connect timeout there and never tried the
    next host; each host now has its share of the bound, and the host that answered is
    tried first next time."""
    real = make_url(pg_url)
    port = real.port or 5432
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        hosts = f"host=127.0.0.1:{silent.getsockname()[1]}&host={real.host}:{port}"
        url = f"postgresql+asyncpg://{real.username}@/{real.database}?{hosts}"
        for _ in range(2):  # the second connect goes straight to the host that answered
            database = Database(f"{url}&target_session_attrs=read-write", connect_timeout=10)
            try:
                async with asyncio.timeout(CHECKOUT_BOUND + 1):
                    assert await served_by(database) == port
            finally:
                await database.dispose()
        silent.setblocking(False)
        knocks = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                silent.accept()[0].close()
                knocks += 1
    assert knocks == 1


async def test_the_inbox_never_doubles_work_across_a_failover(
    make_cluster: MakeCluster, opened: Callable[[PrivatePostgres], Database]
) -> None:
    cluster = make_cluster()  # asynchronous: a promoted replica may lack the last commits
    database = await migrated(cluster, opened(cluster))
    ids = [str(uuid.uuid4()) for _ in range(150)]
    slots = asyncio.Semaphore(8)
    settled = 0

    async def one(message_id: str) -> None:
        nonlocal settled
        async with slots:
            await deliver(database, message_id)
            settled += 1

    work = asyncio.gather(*(one(message_id) for message_id in ids))
    deadline = time.monotonic() + 15
    while settled < 40:  # the failover lands with deliveries in flight
        assert time.monotonic() < deadline, f"only {settled} deliveries settled"
        await asyncio.sleep(0.01)
    await asyncio.to_thread(cluster.crash_primary)
    await asyncio.to_thread(cluster.promote_replica)
    await asyncio.wait_for(work, timeout=30)
    # Every message delivered once more, as after a failover that lost acks: what the
    # promoted replica lacks is run again, what it has is skipped, nothing twice.
    for message_id in ids:
        await deliver(database, message_id)
    found = await effects(database)
    assert set(found) == set(ids)
    assert all(count == 1 for count in found.values()), {k: v for k, v in found.items() if v > 1}


async def test_a_synchronous_commit_acknowledged_before_the_crash_survives_it(
    make_cluster: MakeCluster, opened: Callable[[PrivatePostgres], Database]
) -> None:
    cluster = make_cluster(synchronous=True)
    database = await migrated(cluster, opened(cluster))
    ids = [f"sync-{n}" for n in range(50)]
    for message_id in ids:  # each COMMIT returned: the replica has flushed it
        assert await deliver(database, message_id, within=5.0)
    await asyncio.to_thread(cluster.crash_primary)  # at once after the last acknowledgement
    await asyncio.to_thread(cluster.promote_replica)
    kept = cluster.sql(cluster.replica_port, "SELECT count(*) FROM effects", database="aura")
    assert int(kept) == len(ids)
    assert await effects(database) == dict.fromkeys(ids, 1)


async def test_an_asynchronous_replica_may_lack_an_acknowledged_commit(
    make_cluster: MakeCluster, opened: Callable[[PrivatePostgres], Database]
) -> None:
    """Why the pg-failover scenario replicates synchronously: an acknowledged COMMIT the
    replica never received is gone after the promotion (the replica lags, made exact by
    cutting its stream); the inbox lets a redelivery run it again, if one comes."""
    cluster = make_cluster()
    database = await migrated(cluster, opened(cluster))
    assert await deliver(database, "replicated")
    await asyncio.to_thread(cluster.wait_replicated)
    await asyncio.to_thread(cluster.detach_replica)
    assert await deliver(database, "acknowledged-then-lost")
    await asyncio.to_thread(cluster.crash_primary)
    await asyncio.to_thread(cluster.promote_replica)
    assert await effects(database) == {"replicated": 1}
    assert await deliver(database, "acknowledged-then-lost")  # a redelivery runs it again
    assert not await deliver(database, "replicated")
