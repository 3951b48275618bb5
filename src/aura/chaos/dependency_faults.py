"""The scenarios where a dependency runs out: the database's connections, the broker's
memory.

    scenario        fault
    db-exhausted    the worker's database connections run out: every slot taken for 20 s,
                    then 2 free for 15 s, then all free (``ALTER ROLE ... CONNECTION LIMIT``
                    0, 2, -1 on a LOGIN role of the run's own: PostgreSQL refuses with
                    SQLSTATE 53300, as for "too many clients"); half the records are posted
                    as the window opens
    broker-blocked  the run's own RabbitMQ node raises a memory alarm (it blocks every
                    connection that publishes) for 40 s, an import in flight as it starts
                    and more records posted through it; then the alarm clears

How "every slot taken" is made without touching the server's settings: the worker (and
nothing else: the gateway, the relay and the run's bookkeeping keep the run's URL)
connects as a non-superuser LOGIN role, ``<database>_worker`` (superusers are exempt from
connection limits), granted what it needs on the run's tables after the migrations. The
limit refuses only new connections, so through the zero-slot window the role's *idle*
backends are terminated every 0.25 s (its pooled connections); one in a transaction is
never touched: it ends, goes idle, and goes at the next sweep. The role is dropped with
the run's stack (``OwnedStack.add_role``), after Ctrl-C too. The alarm is node-wide, so
broker-blocked's broker is a node the run starts (``own_broker``), never the machine's;
its gateway publishes as ``aura gateway`` does (``amqp_gateway``), the one that sees an
alarm.

What each proves, beyond the accounting's invariants (DESIGN.md 1 and 10). db-exhausted:
a database outage defers work: every record committed once, no dead letter (none
``max_retries_exceeded``), no retry spent, at most the worker's slots in LLM calls while
no slot is free (a delivery past its inbox read when the window opened still makes its
call), records waited through the window (pending at its end), no import record left
``pending`` after the drain; measured: the calls and commits in the window, retries and
deferrals, the time from "all free" to the last commit. broker-blocked: the gateway
answers new writes 503 with Retry-After while the broker blocks it, none slower than
``answer_bound_s``, and ``/readyz`` says so; the worker never exits (no restart, no exit
code but 0); after the alarm every message the gateway accepted has one fate, and none
was dead-lettered by the broker.

Failures accepted, written down. broker-blocked: the broker tells a connection it is
blocked only when it publishes, so the first write under the alarm is accepted (its
messages wait in the outbox and go when the alarm clears), and so is the first after the
gateway's batch in flight gives up on its confirms (30 s) and its connection is made
again; a refused import is not accepted (refused before anything is staged: nothing of
it is written), so the accounting never counts it, and the scenario posts it again after
the alarm, as a client honouring Retry-After does: every record is accepted once in the
end. Its retries are counted, not failed: an ingest whose enrichment's publish waits
past the soft time limit is retried (that publish waits off the loop), and its claim
finds the committed ingest after. db-exhausted: the window's calls are read from the
simulator's count at its start and end (a call counts when it arrives).
"""

from __future__ import annotations

import asyncio
import math
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
from aura.chaos.run import ChaosRun, _all_committed, _extra_calls
from aura.chaos.shared_state import broker_dead_lettered
from aura.db import Database
from aura.db.models import ProcessedMessage
from aura.llm import Faults

__all__ = ["BrokerBlocked", "DatabaseExhausted"]

_GATE_CLOSED = "holding deliveries until it answers"  # aura.messaging.gate's warning
# Read as the run's own (superuser) role, through the windows.
_COMMITTED = "select count(*) from processed_messages"
_PENDING = "select count(*) from import_records where status = 'pending'"
_BACKENDS = "select count(*) from pg_stat_activity where usename = :role"


async def _run_sql(url: str, *statements: str) -> None:
    """Statements in autocommit, as the run's own (superuser) URL."""
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            for statement in statements:
                await connection.execute(text(statement))
    finally:
        await engine.dispose()


async def _final_records(database: Database, import_ids: list[uuid.UUID]) -> dict[str, int]:
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
        await _run_sql(
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
            await _run_sql(self.stack.database_url, f'ALTER ROLE "{self.role}" CONNECTION LIMIT -1')

    async def before_count(self, database: Database) -> None:
        self.details["import_records"] = await _final_records(database, self.import_ids)
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
        failures = _all_committed(accounting, self.records)
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
        failures += _extra_calls(accounting, self.concurrency + killed)
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


class BrokerBlocked(ChaosRun):
    name = "broker-blocked"
    summary = "the run's own RabbitMQ node blocks publishers (a memory alarm) for 40 s"
    expected_fates = (
        "every accepted message one fate (committed once or dead-lettered; none by the "
        "broker), 0 lost; new writes 503 + Retry-After in the window, none slower than "
        "5 s; the worker never exits; refused imports posted again after the alarm"
    )
    own_broker = True
    amqp_gateway = True
    # Few slots and slow answers: the import in flight is still being worked when the
    # alarm comes (rabbitmqctl itself takes a second or two).
    worker_slots = 4
    faults = Faults(latency=0.25)
    window_s = 40.0
    posts_in_window = 20
    answer_bound_s = 5.0
    repost_within_s = 60.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.posts: list[dict[str, Any]] = []

    def first_records(self) -> list[str]:
        return self.records[: len(self.records) * 2 // 5]

    async def _post(self, records: list[str], since: float) -> int:
        """POST ``records`` as one import; an accepted one (202) is the run's to count."""
        started = time.monotonic()
        response = await self._client.post(
            f"/v1/tenants/{self.tenant_id}/imports",
            content="\n".join(records).encode(),
            headers={"X-API-Key": self._key, "content-type": "application/x-ndjson"},
        )
        took = time.monotonic() - started
        if response.status_code == 202:
            self.import_ids.append(uuid.UUID(response.json()["import_id"]))
        elif response.status_code != 503:
            raise RuntimeError(
                f"the gateway answered {response.status_code}: {response.text[:300]}"
            )
        self.posts.append(
            {
                "at_s": round(started - since, 2),
                "status": response.status_code,
                "took_s": round(took, 3),
                "retry_after": response.headers.get("retry-after"),
                "records": len(records),
            }
        )
        return response.status_code

    async def _in_flight(self) -> dict[str, int]:
        """Import records not yet final and products not yet enriched, now."""
        database = Database.from_settings(self.settings)
        try:
            counts = await self._tally(database)
        finally:
            await database.dispose()
        enrichments = counts.done - counts.enriched
        return {"records_pending": counts.pending, "enrichments_pending": enrichments}

    async def fault(self) -> None:
        node = self.stack.rabbitmq
        assert node is not None, "broker-blocked runs on its own RabbitMQ node"
        self.details["rabbitmq_node"] = node.node
        first = len(self.first_records())
        in_flight = first + len(self.records) // 5
        await self.post_import(self.records[first:in_flight])  # the import in flight
        await asyncio.to_thread(node.block_publishers)
        alarm = time.monotonic()
        self.details["in_flight_at_alarm"] = await self._in_flight()
        rest = self.records[in_flight:]
        size = max(1, math.ceil(len(rest) / self.posts_in_window))
        chunks = [rest[i : i + size] for i in range(0, len(rest), size)]
        gap = self.window_s / (len(chunks) + 1)
        refused: list[list[str]] = []
        try:
            for index, chunk in enumerate(chunks, start=1):
                await asyncio.sleep(max(0.0, alarm + index * gap - time.monotonic()))
                if await self._post(chunk, alarm) == 503:
                    refused.append(chunk)
                if index == 3:
                    ready = await self._client.get("/readyz")
                    self.details["readyz_in_window"] = {
                        "status": ready.status_code,
                        "broker": ready.json().get("checks", {}).get("broker", "ok"),
                    }
            await asyncio.sleep(max(0.0, alarm + self.window_s - time.monotonic()))
        finally:
            await asyncio.to_thread(node.unblock_publishers)
        self.details["alarm_s"] = round(time.monotonic() - alarm, 2)
        await self._post_again(refused, alarm)

    async def _post_again(self, refused: list[list[str]], since: float) -> None:
        """Each refused import again, after the alarm, waiting its Retry-After (bounded)."""
        deadline = time.monotonic() + self.repost_within_s
        for chunk in refused:
            while await self._post(chunk, since) == 503:
                wait = float(self.posts[-1]["retry_after"] or 1)
                if time.monotonic() + wait > deadline:
                    raise RuntimeError(
                        f"the gateway still refused writes {self.repost_within_s:.0f} s "
                        "after the alarm cleared"
                    )
                await asyncio.sleep(wait)
        self.details["reposted_imports"] = len(refused)

    async def heal(self) -> None:
        if self.stack.rabbitmq is not None:  # an alarm cut short clears here too
            await asyncio.to_thread(self.stack.rabbitmq.unblock_publishers)

    async def before_count(self, database: Database) -> None:
        window = [p for p in self.posts if p["at_s"] <= self.window_s]
        self.details["window_posts"] = {
            str(status): sum(1 for p in window if p["status"] == status)
            for status in sorted({p["status"] for p in window})
        }
        self.details["slowest_answer_in_window_s"] = max((p["took_s"] for p in window), default=0)
        self.details["refused_without_retry_after"] = sum(
            1 for p in window if p["status"] == 503 and not p["retry_after"]
        )
        self.details["posts"] = self.posts
        self.details["import_records"] = await _final_records(database, self.import_ids)
        letters = await asyncio.to_thread(self._read_letters)
        self.details["broker_dead_lettered"] = broker_dead_lettered(letters)

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        self.details["retries"], self.details["soft_timeouts"] = (
            metrics["retries"],
            metrics["soft_timeouts"],
        )
        failures = []
        fated = accounting.committed_once + sum(accounting.dead_lettered.values())
        if fated != accounting.accepted:
            failures.append(
                f"{accounting.accepted} accepted, {accounting.committed_once} committed once "
                f"+ {sum(accounting.dead_lettered.values())} dead-lettered"
            )
        records = sum(self.details.get("import_records", {}).values())
        if records != len(self.records):
            failures.append(f"{records} of {len(self.records)} records accepted in the end")
        if self.details.get("broker_dead_lettered"):
            failures.append(f"{self.details['broker_dead_lettered']} broker-dead-lettered")
        refused = self.details.get("window_posts", {}).get("503", 0)
        if not refused:
            failures.append("no write was refused with 503 while the broker blocked")
        if self.details.get("refused_without_retry_after"):
            failures.append("a 503 without Retry-After")
        slowest = self.details.get("slowest_answer_in_window_s", 0)
        if slowest > self.answer_bound_s:
            failures.append(f"a write under the alarm was answered in {slowest} s")
        ready = self.details.get("readyz_in_window", {})
        if ready.get("status") != 503 or not str(ready.get("broker", "")).startswith("blocked"):
            failures.append(f"/readyz under the alarm: {ready}")
        in_flight = self.details.get("in_flight_at_alarm", {})
        if not any(in_flight.values()):
            failures.append("no import was in flight when the alarm began")
        if self.worker_restarts or any(self.details.get("worker_exit_codes", [])):
            failures.append(
                f"the worker exited: {self.worker_restarts} restarts, exit codes "
                f"{self.details.get('worker_exit_codes')}"
            )
        return failures
