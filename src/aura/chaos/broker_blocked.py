"""broker-blocked: the run's own RabbitMQ node raises a memory alarm (it blocks every
connection that publishes) for 40 s, an import in flight as it starts and more records
posted through it; then the alarm clears. The alarm is node-wide, so the broker is a node
the run starts (``own_broker``), never the machine's; its gateway publishes as ``aura
gateway`` does (``amqp_gateway``), the one that sees an alarm.

What it proves, beyond the accounting's invariants (DESIGN.md 1 and 10): the gateway
answers new writes 503 with Retry-After while the broker blocks it, none slower than
``answer_bound_s``, and ``/readyz`` says so; the worker never exits (no restart, no exit
code but 0); after the alarm every message the gateway accepted has one fate, and none
was dead-lettered by the broker.

Failures accepted, written down: the broker tells a connection it is blocked only when it
publishes, so the first write under the alarm is accepted (its messages wait in the
outbox and go when the alarm clears), and so is the first after the gateway's batch in
flight gives up on its confirms (30 s) and its connection is made again; a refused import
is not accepted (refused before anything is staged: nothing of it is written), so the
accounting never counts it, and the scenario posts it again after the alarm, as a client
honouring Retry-After does: every record is accepted once in the end. Its retries are
counted, not failed: an ingest whose enrichment's publish waits past the soft time limit
is retried (that publish waits off the loop), and its claim finds the committed ingest
after.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from typing import Any

from aura.chaos.accounting import Accounting
from aura.chaos.db_exhausted import final_records
from aura.chaos.run import ChaosRun
from aura.chaos.shared_state import broker_dead_lettered
from aura.db import Database
from aura.llm import Faults

__all__ = ["BrokerBlocked"]


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
            counts = await self.tally_now(database)
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
        self.details["import_records"] = await final_records(database, self.import_ids)
        letters = await asyncio.to_thread(self.read_letters)
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
