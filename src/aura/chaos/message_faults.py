"""The scenarios on what the messages themselves carry: malformed records, malformed raw
broker messages, a message id reused with another payload, a 10 MB record."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from kombu.connection import Connection

from aura.chaos.accounting import Accounting, Sent
from aura.chaos.expectations import expect_letters, extra_calls
from aura.chaos.records import MALFORMED_RECORDS, malformed_messages, valid_records
from aura.chaos.run import ChaosRun
from aura.contract import BULK_QUEUE, ENRICH_TASK, INGEST_TASK, REALTIME_QUEUE
from aura.messaging.topology import WORK_EXCHANGE

__all__ = ["LargeRecord", "MalformedMessages", "Poison", "ReusedMessageId"]


# 1 ----------------------------------------------------------------------------------
class Poison(ChaosRun):
    name = "poison"
    summary = "malformed records (bad JSON, bad encoding, missing keys, wrong types) → DLQ"
    expected_fates = "good records committed once; each malformed one poison_pill, 0 retries"

    @classmethod
    def make_records(cls, products: int, rng: Any) -> list[str]:
        good = valid_records(products)
        count = max(len(MALFORMED_RECORDS), products // 10)
        mixed = good + [MALFORMED_RECORDS[i % len(MALFORMED_RECORDS)] for i in range(count)]
        rng.shuffle(mixed)
        return mixed

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        bad = sum(1 for r in self.records if r in MALFORMED_RECORDS)
        failures = expect_letters(accounting, len(self.records) - bad, {"poison_pill": bad})
        if metrics["retries"]:
            failures.append(f"{metrics['retries']} retries: poison pills spend none")
        return failures + extra_calls(accounting)


class MalformedMessages(ChaosRun):
    name = "malformed"
    summary = "malformed messages published raw to the work queues (every envelope kind)"
    expected_fates = "records committed once; each raw message malformed_message, byte for byte"

    async def fault(self) -> None:  # raw, while the worker consumes the records
        await asyncio.to_thread(self._publish_raw)

    def _publish_raw(self) -> None:
        kinds = malformed_messages("")  # the kinds, for the count
        with Connection(self.stack.broker_url, transport_options={"confirm_publish": True}) as conn:
            producer = conn.Producer()
            for index in range(len(kinds)):
                marker = f"chaos-malformed-{uuid.uuid4().hex}"
                _, body, content_type, encoding, headers = malformed_messages(marker)[index]
                producer.publish(
                    body,
                    exchange=WORK_EXCHANGE.name,
                    routing_key=self.rng.choice([BULK_QUEUE, REALTIME_QUEUE]),
                    content_type=content_type,
                    content_encoding=encoding,
                    headers=headers or {},
                    delivery_mode="persistent",
                )
                self.sent.append(Sent("", marker=marker.encode()))
        self.details["malformed_kinds"] = sorted({kind for kind, *_ in kinds})

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        return expect_letters(
            accounting, len(self.records), {"malformed_message": len(self.sent)}
        ) + extra_calls(accounting)


# 12 ---------------------------------------------------------------------------------
class ReusedMessageId(ChaosRun):
    name = "reused-id"
    summary = "a committed message id sent again with another payload (ingest and enrich)"
    expected_fates = "records committed once; each reuse one conflicting_message_id letter"

    async def on_tick(self, counts: Any) -> None:
        if self.sent or counts.enriched < 2:
            return
        from sqlalchemy import select

        from aura.catalog import Enrichment, ImportRecord
        from aura.db import Database

        database = Database.from_settings(self.settings)
        try:
            async with database.session() as session:
                record_id, product_id = (
                    await session.execute(
                        select(ImportRecord.message_id, ImportRecord.product_id)
                        .join(Enrichment, Enrichment.product_id == ImportRecord.product_id)
                        .limit(1)
                    )
                ).one()
                other = await session.scalar(
                    select(Enrichment.product_id).where(Enrichment.product_id != product_id)
                )
        finally:
            await database.dispose()
        other_record = valid_records(len(self.records) + 1)[-1]
        reuses = [
            (INGEST_TASK, [other_record, str(self.tenant_id)], record_id, BULK_QUEUE),
            (
                ENRICH_TASK,
                [str(other), str(self.tenant_id)],
                f"enrich-{product_id}",
                REALTIME_QUEUE,
            ),
        ]
        for task, args, message_id, queue in reuses:
            await asyncio.to_thread(
                self.publisher.send_task, task, args=args, task_id=message_id, queue=queue
            )
            self.sent.append(Sent(message_id, conflict=True))

    def awaiting_more(self, letters: list[Any]) -> bool:
        return not self.sent or super().awaiting_more(letters)

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        failures = []
        if accounting.committed_once != 2 * len(self.records):
            failures.append(f"committed {accounting.committed_once} of {2 * len(self.records)}")
        if accounting.dead_lettered != {"conflicting_message_id": len(self.sent)}:
            failures.append(
                f"expected {len(self.sent)} conflicting_message_id letters, "
                f"got {accounting.dead_lettered}"
            )
        return failures + extra_calls(accounting)


# 13 ---------------------------------------------------------------------------------
class LargeRecord(ChaosRun):
    """A 10 MB record, twice: in an import through the gateway (refused at the edge,
    whole: nothing of that import is written), and as an ingest message published
    straight to the work queue, past the gateway (the worker's fate: poison_pill)."""

    name = "large-record"
    summary = "a 10 MB record: refused by the gateway; published raw, poison_pill"
    expected_fates = (
        "records committed once; the gateway refuses the 10 MB import (4xx, nothing "
        "written); the raw 10 MB message poison_pill"
    )
    record_bytes = 10 * 1024 * 1024

    def _huge(self) -> str:
        padding = "x" * self.record_bytes
        return json.dumps(
            {"title": "Huge", "brand": padding, "variants": [{"sku": "HUGE-1", "price": "1"}]}
        )

    async def fault(self) -> None:
        huge = self._huge()
        response = await self._client.post(
            f"/v1/tenants/{self.tenant_id}/imports",
            content="\n".join([valid_records(1)[0], huge]).encode(),
            headers={"X-API-Key": self._key, "content-type": "application/x-ndjson"},
        )
        self.details["gateway_status"] = response.status_code
        message_id = f"large-record-{uuid.uuid4()}"
        await asyncio.to_thread(
            self.publisher.send_task,
            INGEST_TASK,
            args=[huge, str(self.tenant_id)],
            task_id=message_id,
            queue=BULK_QUEUE,
        )
        self.sent.append(Sent(message_id))

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        failures = expect_letters(accounting, len(self.records), {"poison_pill": 1})
        status = self.details.get("gateway_status")
        if not (isinstance(status, int) and 400 <= status < 500):
            failures.append(f"the gateway answered the 10 MB import with {status}, not a 4xx")
        return failures
