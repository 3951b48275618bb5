"""db-exhausted: the worker's database connections run out. Every slot is taken for
20 s, then 2 are free for 15 s, then all (``ALTER ROLE ... CONNECTION LIMIT`` 0, 2, -1
on a LOGIN role of the run's own: PostgreSQL refuses with SQLSTATE 53300, as for "too
many clients"); half the records are posted as the window opens.

How "every slot taken" is made without touching the server's settings: the worker (and
nothing else: the gateway, the relay and the run's bookkeeping keep the run's URL)
connects as a non-superuser LOGIN role, ``<database>_worker`` (superusers are exempt from
connection limits), granted what it needs on the run's tables after the migrations. The
limit refuses only new connections, so through the zero-slot window the role's *idle*
backends are terminated every 0.25 s (its pooled connections); one in a transaction is
never touched: it ends, goes idle, and goes at the next sweep. The role is dropped with
the run's stack (``OwnedStack.add_role``), after Ctrl-C too.

What it proves, beyond the accounting's invariants (DESIGN.md 1 and 10): a database
outage defers work: every record committed once, no dead letter (none
``max_retries_exceeded``), no retry spent, at most the worker's slots in LLM calls while
no slot is free (a delivery past its inbox read when the window opened still makes its
call), records waited through the window (pending at its end), no import record left
``pending`` after the drain; measured: the calls and commits in the window, retries and
deferrals, the time from "all free" to the last commit.

Failure accepted, written down: the window's calls are read from the simulator's count at
its start and end (a call counts when it arrives).
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from aura.catalog import ImportRecord
from aura.chaos.accounting import Accounting
from aura.chaos.expectations import all_committed, extra_calls
from aura.chaos.run import ChaosRun
from aura.db import Database, ProcessedMessage
from aura.llm import Faults

__all__ = ["DatabaseExhausted", "final_records", "run_sql"]

_GATE_CLOSED = "holding deliveries until it answers"  # aura.messaging._gate's warning
# Read as the run's own (superuser) role, through the windows.
_COMMITTED = "select count(*) from processed_messages"
_PENDING = "select count(*) from import_records where status = 'pending'"
_BACKENDS = "select count(*) from pg_stat_activity where usename = :role"


async def run_sql(url: str, *statements: str) -> None:
    """Statements in autocommit, as the run's own (superuser) URL."""
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            for statement in statements:
                await connection.execute(text(statement))
    finally:
        await engine.dispose()


async def final_records(database: Database, import_ids: list[uuid.UUID]) -> dict[str, int]:
    """The run's import records by status (``pending`` is the one that is not final)."""
    async with database.session() as session:
        rows = (
            await session.execute(
                select(ImportRecord.status, func.count())
                .where(ImportRecord.import_id.in_(import_ids))
                .group_by(ImportRecord.status)
            )
        ).all()
    return {str(status): int(count) for status, count in rows}


class DatabaseExhausted(ChaosRun):
    name = "db-exhausted"
    summary = "the worker's database connections run out: none for 20 s, 2 for 15 s, then all"
    expected_fates = (
        "all committed once; no dead letter (none max_retries_exceeded), no retry spent; at "
        "most one LLM call per worker slot while no slot is free; no import record pending"
    )
    faults = Faults(latency=0.05)  # enrichments in flight when the window opens
    zero_s = 20.0
    scarce_s = 15.0
    scarce_slots = 2
    sweep_s = 0.25

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.role: str | None = None
        self._role_url: str | None = None
        self._all_free_at: datetime | None = None

    def first_records(self) -> list[str]:
        return self.records[: len(self.records) // 2]

    async def before_load(self) -> None:
        """The worker's role, after the migrations (its grants name the tables)."""
        role = self.stack.add_role("worker")  # dropped with the stack from here on
        password = secrets.token_hex(16)
        await run_sql(
            self.stack.database_url,
            f"CREATE ROLE \"{role}\" LOGIN NOSUPERUSER PASSWORD '{password}'",
            f'GRANT CONNECT ON DATABASE "{self.stack.database}" TO "{role}"',
            f'GRANT USAGE ON SCHEMA public TO "{role}"',
            f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"',
            f'GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO "{role}"',
        )
        self.role = role
        url = make_url(self.stack.database_url).set(username=role, password=password)
        self._role_url = url.render_as_string(hide_password=False)
        self.details["worker_role"] = role

    def worker_environment(self, index: int) -> dict[str, str]:
        assert self._role_url is not None
        return {"DATABASE_URL": self._role_url}

    async def _limit(self, admin: AsyncConnection, slots: int) -> None:
        await admin.execute(text(f'ALTER ROLE "{self.role}" CONNECTION LIMIT {slots}'))

    async def _sweep(self, admin: AsyncConnection) -> int:
        """Terminate the role's idle backends (never one in a transaction); how many."""
        killed = await admin.execute(
            text(
                "select count(pg_terminate_backend(pid)) from pg_stat_activity "
                "where usename = :role and state = 'idle'"
            ),
            {"role": self.role},
        )
        return int(killed.scalar() or 0)

    async def _count(self, admin: AsyncConnection, query: str) -> int:
        return int((await admin.execute(text(query), {"role": self.role})).scalar() or 0)

    async def fault(self) -> None:
        window: dict[str, Any] = {}
        self.details["window"] = window
        engine = create_async_engine(self.stack.database_url, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as admin:
                await self._limit(admin, 0)
                opened, calls_before = time.monotonic(), self.simulator.requests
                window["no_slot_from"] = datetime.now(UTC).isoformat()
                commits_before = await self._count(admin, _COMMITTED)
                terminated = await self._sweep(admin)
                await self.post_import(self.records[len(self.first_records()) :])
                while (left := opened + self.zero_s - time.monotonic()) > 0:
                    await asyncio.sleep(min(self.sweep_s, left))
                    terminated += await self._sweep(admin)
                self.details["llm_calls_while_no_slot"] = self.simulator.requests - calls_before
                self.details["commits_while_no_slot"] = (
                    await self._count(admin, _COMMITTED) - commits_before
                )
                self.details["records_waiting_at_no_slot_end"] = await self._count(admin, _PENDING)
                await self._limit(admin, self.scarce_slots)
                window[f"{self.scarce_slots}_slots_from"] = datetime.now(UTC).isoformat()
                scarce_until, most = time.monotonic() + self.scarce_s, 0
                while (left := scarce_until - time.monotonic()) > 0:
                    most = max(most, await self._count(admin, _BACKENDS))
                    await asyncio.sleep(min(self.sweep_s, left))
                await self._limit(admin, -1)
                self._all_free_at = datetime.now(UTC)
                window["all_free_from"] = self._all_free_at.isoformat()
        finally:
            await engine.dispose()
        window["no_slot_s"], window["scarce_s"] = self.zero_s, self.scarce_s
        self.details["idle_backends_terminated"] = terminated
        self.details["most_backends_while_scarce"] = most

    async def heal(self) -> None:
        if self.role is not None:  # a window cut short frees the slots here too
            await run_sql(self.stack.database_url, f'ALTER ROLE "{self.role}" CONNECTION LIMIT -1')

    async def before_count(self, database: Database) -> None:
        self.details["import_records"] = await final_records(database, self.import_ids)
        async with database.session() as session:
            last = await session.scalar(
                select(func.max(ProcessedMessage.processed_at)).where(
                    ProcessedMessage.tenant_id == self.tenant_id
                )
            )
        if last is not None and self._all_free_at is not None:
            after = (last - self._all_free_at).total_seconds()
            self.details["last_commit_after_all_free_s"] = round(after, 2)
        # Informative only: the run's own log lines may overwrite the worker's in that file.
        log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        self.details["gate_closed_lines"] = log.count(_GATE_CLOSED)

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        failures = all_committed(accounting, self.records)
        self.details["retries"], self.details["deferrals"] = (
            metrics["retries"],
            metrics["deferrals"],
        )
        calls = self.details.get("llm_calls_while_no_slot")
        if calls is None:
            failures.append("the zero-slot window did not run to its end")
        elif calls > self.concurrency:
            failures.append(
                f"{calls} LLM calls while no connection slot was free "
                f"(at most {self.concurrency}: the calls in flight)"
            )
        # An outage defers work (DESIGN.md invariant 10): no retry is spent on it. Only a
        # connection the scenario itself terminated may cost one -- a statement already on
        # it when it died is a cut connection, whose outcome a retry and the inbox settle
        # -- and no time limit may pass while deliveries are held.
        killed = int(self.details.get("idle_backends_terminated", 0))
        if metrics["retries"] > killed or metrics["soft_timeouts"] or metrics["hard_timeouts"]:
            failures.append(
                f"{metrics['retries']} retries spent in the database outage (at most {killed}, "
                f"one per terminated connection; {metrics['soft_timeouts']} soft time limits, "
                f"{metrics['hard_timeouts']} hard)"
            )
        # A delivery whose LLM call was made when its write met the outage makes it again
        # once the gate opens: at most one per task in flight, plus one per killed
        # connection.
        failures += extra_calls(accounting, self.concurrency + killed)
        pending = self.details.get("import_records", {}).get("pending", 0)
        if pending:
            failures.append(f"{pending} import records still pending after the drain")
        if not self.details.get("records_waiting_at_no_slot_end"):
            failures.append("no record waited for a connection: the window missed the work")
        if self.details.get("most_backends_while_scarce", 0) > self.scarce_slots:
            failures.append(
                f"{self.details['most_backends_while_scarce']} backends of the role while "
                f"{self.scarce_slots} slots were free"
            )
        return failures
