"""pg-failover: the run's own PostgreSQL primary is SIGKILLed (with every process it
forked, as a host dies) while the worker consumes -- the moment a statement runs on it,
so the crash cuts work in flight -- and its streaming replica is promoted at once. The
run's database lives on that pair (``own_database = "replicated"``:
``aura.chaos.pg_node.PrivatePostgres``), never on the machine's server. Every client --
the worker, the gateway, its relay and dispatcher, the run's bookkeeping -- is given the
one multi-host URL and nothing else (no one is told of the failover)::

    postgresql+asyncpg://postgres@/<db>?host=127.0.0.1:<p1>&host=127.0.0.1:<p2>&target_session_attrs=read-write

What it proves, beyond the accounting's invariants: every record committed once, none
dead-lettered (by Aura or by the broker), and the worker's throughput (enrichments
committed per second) back to >= 90 % of its rate before the crash within 10 s of the
crash. Measured: the crash to the first commit on the promoted replica, the time to
recover, records/s during the fault, and a per-second timeline around it.

How the clients follow (asyncpg 0.32, read in ``asyncpg/connect_utils.py``): a new
connection tries the hosts in order; the dead primary refuses (``OSError``), the replica
is connected to and dropped while it is a hot standby (``in_hot_standby``, reported at
start-up: no extra query), and chosen once promoted. Until then the refusal is raised: an
outage (``aura.db.is_outage``), so the worker's outage gate holds deliveries (no retry
spent, no LLM call) and tries again within a second. A pooled connection to the dead
primary is closed under the pool: discarded at checkout (``_skip_closed``, no round trip),
or, when the crash cut its statement, a ``network_error`` rollback and a retry; a COMMIT
cut in flight is ambiguous (``commit_outcome_unknown``) and the redelivery's inbox decides.

Why the replica is synchronous (``replicate_synchronously``, before the worker starts).
Asynchronous replication keeps the inbox's promise -- an effect never doubles, since a
claim and its effect are one transaction and are lost together -- but not "never lost":
a promoted replica may lack the last commits the primary acknowledged, and Aura acts on
acknowledged commits:

    commit the replica never received         what follows
    a worker effect whose message was acked   nothing redelivers it: an enrichment is lost;
    (the ack follows the COMMIT's reply)      an ingest's product is gone, its record stays
                                              pending, and its enrichment (already queued)
                                              finds no product: dead-lettered
    a worker effect, message not yet acked    its delivery failed with the connection, so
                                              it is retried: the inbox has no row, the work
                                              runs again (an LLM call again). Safe.
    an import the gateway answered 202        a lost acceptance: its records and outbox
                                              rows are gone; messages already published
                                              run, the rest never go
    outbox rows deleted once sent             published again by the relay: the inbox
                                              absorbs the twin (a duplicate delivery)
    DLQ store filings (rows, then broker ack) the letters are gone from the store

No layer above the database can undo a lost acknowledged commit. Synchronous replication
(``synchronous_standby_names``, ``synchronous_commit = on``) can: a COMMIT returns only
once a standby has flushed it, so the promoted standby holds everything anyone was told.
A COMMIT cut while it waits for the standby is ambiguous like any cut COMMIT: the worker's
redelivery and inbox decide, the gateway answers 503 (nothing accepted). Hence this
scenario replicates synchronously; ``tests/db/test_pg_failover.py`` shows an asynchronous
replica losing an acknowledged commit (its stream cut first: exact, not a race).

Accepted, written down: the scenario is the failover manager, so the promotion follows
the crash at once (Patroni, repmgr or a cloud's take their own detection time, during
which the database is out and deliveries are held). The crash lands when a statement is
seen running, yet usually cuts none of the worker's (its tasks mostly wait on the LLM):
network rollbacks and retries are counted, not required. The throughput is read after the
run from the database's own timestamps (``statement_timestamp()`` of each enrichment and
claim; the crash's instant from the primary's clock at the last look plus the kill's own
duration): one clock, and nothing read through the fault.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, ClassVar

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from aura.chaos.accounting import Accounting
from aura.chaos.expectations import all_committed
from aura.chaos.pg_node import PrivatePostgres
from aura.chaos.run import ChaosRun
from aura.chaos.shared_state import broker_dead_lettered
from aura.chaos.throughput import enriched_stamps, rate, recovered_after, timeline
from aura.db import Database
from aura.llm import Faults

__all__ = ["PostgresFailover"]

# Statements running on the primary now (the look's own aside), and its clock.
_ACTIVE = (
    "SELECT count(*), extract(epoch FROM clock_timestamp())::float8 FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
    "AND backend_type = 'client backend' AND state = 'active'"
)
_FIRST_AFTER = (
    "SELECT extract(epoch FROM min(processed_at))::float8 FROM processed_messages "
    "WHERE tenant_id = :tenant AND processed_at > to_timestamp(:since)"
)


class PostgresFailover(ChaosRun):
    name = "pg-failover"
    summary = "the run's own PostgreSQL primary crashed (SIGKILL), its sync replica promoted"
    expected_fates = (
        "all committed once, none dead-lettered (none by the broker); throughput back to "
        ">= 90 % of its rate before the crash within 10 s of it"
    )
    own_database: ClassVar[str] = "replicated"
    # Slow enough answers that the run lasts well past the fault (~30 records/s through 20
    # slots: 600 records take ~20 s), jittered so the slots do not finish in lockstep
    # (the rate per second swung 20/40 without it: a 2 s window could read 89 %).
    faults = Faults(latency=0.4, jitter=0.2)
    steady_s = 6.0  # after the worker's first fate: the baseline is the last 3 s of it
    aim_s = 3.0  # how long the crash waits for a statement in flight to cut
    baseline_s = 3.0
    recover_within_s = 10.0
    share = 0.9
    window_s = 2.0  # the rate after the crash is read over windows this long

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.crashed_at: float | None = None  # the primary's clock (epoch s) at the kill

    def _pair(self) -> PrivatePostgres:
        postgres = self.stack.postgres
        assert isinstance(postgres, PrivatePostgres), "pg-failover runs on its own pair"
        return postgres

    async def before_load(self) -> None:
        """Synchronous replication before any record goes in (see the module doc)."""
        await asyncio.to_thread(self._pair().replicate_synchronously)
        self.details["replication"] = "synchronous"

    async def fault(self) -> None:
        postgres = self._pair()
        # The replica in step: it has replayed the run's database (a standby still replaying
        # CREATE DATABASE refuses connections to it, and asyncpg then tries no other host).
        await asyncio.to_thread(postgres.wait_replicated)
        await asyncio.sleep(self.steady_s)
        self.details["statements_running_at_crash"] = await self._crash_mid_statement(postgres)
        killed = time.monotonic()
        self.details["crash_to_promoted_s"] = None
        await asyncio.to_thread(postgres.promote_replica)
        self.details["crash_to_promoted_s"] = round(time.monotonic() - killed, 2)

    async def _crash_mid_statement(self, postgres: PrivatePostgres) -> int:
        """Crash the primary the moment a statement runs on it (a crash that finds only
        idle connections cuts no transaction), or after ``aim_s`` whatever runs; the
        statements it found running."""
        primary = f"postgresql+asyncpg://postgres@127.0.0.1:{postgres.primary_port}"
        engine = create_async_engine(
            f"{primary}/{self.stack.database}", isolation_level="AUTOCOMMIT", poolclass=NullPool
        )
        try:
            async with engine.connect() as connection:
                until = time.monotonic() + self.aim_s
                while True:
                    active, now = (await connection.execute(text(_ACTIVE))).one()
                    if active or time.monotonic() > until:
                        looked = time.monotonic()
                        postgres.crash_primary()  # at once: no thread hop between look and kill
                        # The primary's clock at the look, plus the kill's duration: at or
                        # after the kill, so no statement the old primary ran starts later.
                        self.crashed_at = float(now) + time.monotonic() - looked
                        return int(active)
                    await asyncio.sleep(0.002)
        finally:
            await engine.dispose()

    async def heal(self) -> None:
        """A fault window cut short between the crash and the promotion promotes here."""
        postgres = self._pair()
        if self.crashed_at is not None and not postgres.promoted:
            await asyncio.to_thread(postgres.promote_replica)

    async def before_count(self, database: Database) -> None:
        await self._measure(database)
        words = (
            "promote request",
            "redo done",
            "last completed",
            "new timeline",
            "accept connections",
        )
        self.details["replica_log"] = self._pair().log_lines("replica", *words, limit=8)
        letters = await asyncio.to_thread(self.read_letters)
        self.details["broker_dead_lettered"] = broker_dead_lettered(letters)

    async def _measure(self, database: Database) -> None:
        """The throughput around the crash, from the database's own timestamps."""
        crashed = self.crashed_at
        if crashed is None or self.tenant_id is None:
            return
        enriched = await enriched_stamps(database, self.tenant_id)
        async with database.reader.connect() as connection:
            first = (
                await connection.execute(
                    text(_FIRST_AFTER), {"tenant": self.tenant_id, "since": crashed}
                )
            ).scalar()
        details = self.details
        if first is not None:
            details["crash_to_first_commit_s"] = round(float(first) - crashed, 2)
        baseline = rate(enriched, crashed - self.baseline_s, crashed)
        details["records_per_s_before_crash"] = round(baseline, 1)
        recovery = recovered_after(
            enriched, crashed, baseline, share=self.share, window=self.window_s
        )
        details["throughput_recovered_after_s"] = recovery
        # From the crash until the rate is back (a first window at least: a recovery at
        # once would make it a rate over no time)
        until = crashed + max(recovery or 0.0, self.window_s)
        details["records_per_s_during_fault"] = round(rate(enriched, crashed, until), 1)
        details["records_per_s_timeline"] = timeline(enriched, crashed, 5, 15)
        details["enriched_after_crash"] = sum(1 for stamp in enriched if stamp >= crashed)

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        failures = all_committed(accounting, self.records)
        for key in ("network_rollbacks", "retries", "deferrals"):
            self.details[key] = metrics[key]
        self.details["llm_extra_calls"] = accounting.llm_extra
        if self.details.get("broker_dead_lettered"):
            failures.append(f"{self.details['broker_dead_lettered']} broker-dead-lettered")
        if self.crashed_at is None or self.details.get("crash_to_promoted_s") is None:
            failures.append("the primary was not crashed and its replica promoted")
        elif "crash_to_first_commit_s" not in self.details:
            failures.append("nothing was committed on the promoted replica")
        recovery = self.details.get("throughput_recovered_after_s")
        if self.crashed_at is not None and recovery is None:
            failures.append(
                f"the throughput never came back to {self.share:.0%} of its rate before "
                f"the crash ({self.details.get('records_per_s_before_crash')} records/s)"
            )
        elif recovery is not None and recovery > self.recover_within_s:
            failures.append(
                f"the throughput came back {recovery} s after the crash "
                f"(bound {self.recover_within_s:.0f} s)"
            )
        return failures
