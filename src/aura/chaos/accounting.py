"""The accounting of a chaos run, Jepsen's way: every message sent is looked for, and
each is found in exactly one place -- or the run says where it was not.

Read after the heal and the drain, with the worker stopped (so nothing is in flight and
every unacknowledged message is back on its queue), from the run's own services only:

    class                      read from                                   must be
    accepted                   the import records the gateway accepted,     -
                               one enrichment per product made, and what
                               the scenario published itself
    committed once             the inbox (processed_messages): the claim    -
                               is written in the effect's transaction
    dead-lettered by reason    the DLQ, read at the broker (the reader      as the scenario
                               folds second copies: one per id, reason and  expects
                               payload fingerprint)
    conflicting                conflicting_message_id letters: they share   as expected
                               their id with a committed message by design,
                               so they are counted here, not below
    committed AND dead-letter  inbox ∩ DLQ (conflicts aside)                0
    duplicated effects         products beyond one per committed ingest     0
    records disagreeing        import records whose status the inbox        0
                               contradicts
    unaccounted letters        DLQ entries no message of the run explains   0
    extra LLM calls            requests - committed enrichments - failed    as expected
                               requests
    stranded                   still in a work queue, a delayed-delivery    0 (liveness)
                               queue (read at the broker) or the outbox;
                               ``stranded_in`` counts every message left
                               behind, by place (twins of settled ones too)
    lost                       accepted and in none of the places above     0 (safety)

A message is matched by its id; a malformed message (whose id may be missing or invalid)
by a marker its body carries.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kombu.connection import Connection
from kombu.entity import Queue
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from aura.catalog import Enrichment, ImportRecord, Product
from aura.chaos.resources import run_tool
from aura.db import OutboxMessage, ProcessedMessage
from aura.events import DeadLetterReason
from aura.messaging import DeadLetter, DeadLetterQueue
from aura.messaging.topology import DEAD_LETTER_QUEUE

__all__ = [
    "Accounting",
    "BrokerView",
    "Queued",
    "Sent",
    "account",
    "carries",
    "queue_depths",
    "read_broker",
]

_SCAN = 100_000
_SETTLE_S = 90.0  # the longest a delayed retry waits (Celery's levels), and slack
_SAMPLE = 5
_CONFLICT = DeadLetterReason.CONFLICTING_MESSAGE_ID.value


@dataclass(frozen=True)
class Sent:
    """A message the scenario published itself (beside the gateway's imports)."""

    message_id: str
    marker: bytes | None = None  # in its body: how a malformed message is recognised
    conflict: bool = False  # a reused id: its fate is a conflicting_message_id letter


@dataclass(frozen=True)
class Queued:
    queue: str
    message_id: str
    body: bytes


@dataclass
class BrokerView:
    """What the run's vhost holds: every queued message (beyond the DLQ), and the DLQ."""

    queued: list[Queued]
    letters: list[DeadLetter]
    depths: dict[str, int]


def read_broker(
    broker_url: str, vhost: str, store_url: str | None = None, *, node: str | None = None
) -> BrokerView:
    """Browse every queue of ``vhost`` (messages are read, never taken: closing the
    channel puts them back) and read the DLQ.

    With the worker stopped nothing consumes, but a delayed message still moves: RabbitMQ
    dead-letters it from one ``celery_delayed_N`` level to the next as each TTL runs out,
    and at last to its work queue; in transit it is in no queue's count (quorum queues'
    at-least-once dead-lettering). A browse then could miss it and call it lost. So the
    queues' depths (``rabbitmqctl list_queues``: it reads, it changes nothing) are polled
    a second apart until the delayed queues are empty and two polls agree (bounded by
    ``_SETTLE_S``), and only then is the vhost browsed, once: a browsed message of a
    quorum queue comes back with its delivery count raised, and enough browses would
    push it past the work queue's delivery limit into the DLQ. ``node``: the RabbitMQ
    node holding ``vhost`` when it is the run's own (``queue_depths``)."""
    deadline = time.monotonic() + _SETTLE_S
    previous: dict[str, int] | None = None
    while True:
        depths = queue_depths(vhost, node)
        delayed = sum(n for name, n in depths.items() if name.startswith("celery_delayed_"))
        if (depths == previous and not delayed) or time.monotonic() > deadline:
            break
        previous = depths
        time.sleep(1.0)
    with Connection(broker_url, connect_timeout=10) as connection:
        queued = _browse(connection, depths)
        letters = DeadLetterQueue(connection, store_url).list(limit=_SCAN, raw=True)
    return BrokerView(queued, letters, depths)


def queue_depths(vhost: str, node: str | None = None) -> dict[str, int]:
    """Every queue of ``vhost`` and its message count (read-only: rabbitmqctl), on
    ``node`` (a run's own RabbitMQ node) or the machine's."""
    named = ("-n", node) if node else ()
    listing = run_tool(
        "rabbitmqctl", *named, "list_queues", "-p", vhost, "name", "messages", "--quiet",
        "--no-table-headers",
    )  # fmt: skip
    return {
        parts[0]: int(parts[1])
        for parts in (line.split() for line in listing.splitlines())
        if len(parts) == 2 and parts[1].isdigit()
    }


def _browse(connection: Connection, depths: dict[str, int]) -> list[Queued]:
    """The messages of every queue that holds any (the DLQ aside)."""
    queued: list[Queued] = []
    for name, depth in sorted(depths.items()):
        if name == DEAD_LETTER_QUEUE or depth == 0:
            continue
        channel = connection.channel()
        try:
            queue = Queue(name, no_declare=True)(channel)
            for _ in range(min(depth, _SCAN)):
                message = queue.get(no_ack=False)
                if message is None:
                    break
                headers = message.headers if isinstance(message.headers, dict) else {}
                body = message.body if isinstance(message.body, bytes) else b""
                queued.append(Queued(name, str(headers.get("id", "")), body))
        finally:
            channel.close()  # what was read goes back to its queue
    return queued


@dataclass
class Accounting:
    accepted: int
    committed_once: int
    dead_lettered: dict[str, int]
    conflicting: int
    committed_and_dead_lettered: int
    duplicated: int
    records_disagreeing: int
    unaccounted_letters: int
    llm_requests: int
    llm_failed: int
    llm_extra: int
    stranded: int
    stranded_in: dict[str, int]
    lost: int
    samples: dict[str, list[str]] = field(default_factory=dict)

    def failures(self) -> list[str]:
        """What breaks an invariant whatever the scenario (its own expectations aside)."""
        checks = {
            "lost": self.lost,
            "stranded": self.stranded,
            "messages left behind": sum(self.stranded_in.values()),
            "duplicated": self.duplicated,
            "committed and dead-lettered": self.committed_and_dead_lettered,
            "import records disagreeing with the inbox": self.records_disagreeing,
            "unaccounted dead letters": self.unaccounted_letters,
        }
        return [
            f"{label} {count}" + (f" (e.g. {self.samples[label]})" if label in self.samples else "")
            for label, count in checks.items()
            if count
        ]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def carries(letter: DeadLetter, marker: bytes) -> bool:
    """Whether ``letter`` is a malformed original whose bytes hold ``marker``."""
    return letter.original is not None and marker in letter.original.raw()


@dataclass
class _Tables:
    """What the run's database says: its import records (message id, status, product),
    the inbox, the tenant's products and enrichments, the outbox."""

    records: list[Any]
    inbox: set[str]
    products: list[Any]
    enriched: int
    outbox: set[str]


async def _read_tables(
    session: AsyncSession, tenant_id: uuid.UUID, import_ids: Sequence[uuid.UUID]
) -> _Tables:
    records = (
        await session.execute(
            select(ImportRecord.message_id, ImportRecord.status, ImportRecord.product_id).where(
                ImportRecord.import_id.in_(import_ids)
            )
        )
    ).all()
    inbox = set((await session.scalars(select(ProcessedMessage.message_id))).all())
    products = list(
        (await session.scalars(select(Product.id).where(Product.tenant_id == tenant_id))).all()
    )
    enriched = int(
        await session.scalar(
            select(func.count()).select_from(Enrichment).where(Enrichment.tenant_id == tenant_id)
        )
        or 0
    )
    outbox = set((await session.scalars(select(OutboxMessage.message_id))).all())
    return _Tables(list(records), inbox, products, enriched, outbox)


def _ordinary(records: list[Any], extra: list[Sent]) -> list[str]:
    """The ids of the messages that must commit once: every import record's ingest, one
    enrichment per product an ingest made (a product nobody made is a duplicate), and
    what the scenario sent itself (malformed and conflicting ones aside)."""
    ordinary = [str(message_id) for message_id, _, _ in records]
    made = sorted({str(product_id) for _, _, product_id in records if product_id is not None})
    ordinary += [f"enrich-{product_id}" for product_id in made]
    ordinary += [s.message_id for s in extra if s.marker is None and not s.conflict]
    return ordinary


def _unfated(
    ordinary: list[str], extra: list[Sent], tables: _Tables, broker: BrokerView
) -> tuple[list[str], list[str]]:
    """The messages without a fate: stranded (still in a queue or the outbox), or lost."""
    dead_ids = {x.message_id for x in broker.letters if x.reason.value != _CONFLICT}
    conflict_ids = {x.message_id for x in broker.letters if x.reason.value == _CONFLICT}
    queued_ids = {q.message_id for q in broker.queued}
    stranded: list[str] = []
    lost: list[str] = []
    for message_id in ordinary:
        if message_id in tables.inbox or message_id in dead_ids:
            continue
        waiting = message_id in queued_ids or message_id in tables.outbox
        (stranded if waiting else lost).append(message_id)
    for s in extra:
        if s.conflict and s.message_id not in conflict_ids:
            (stranded if s.message_id in queued_ids else lost).append(s.message_id)
    for s in extra:
        marker = s.marker
        if marker is not None and not any(carries(x, marker) for x in broker.letters):
            queued = any(marker in q.body for q in broker.queued)
            (stranded if queued else lost).append(s.message_id or marker.decode(errors="replace"))
    return stranded, lost


def _unaccounted(broker: BrokerView, explained: set[str], malformed: list[Sent]) -> list[str]:
    """Dead letters no message of the run explains."""
    return [
        x.id
        for x in broker.letters
        if x.message_id not in explained
        and not any(s.marker is not None and carries(x, s.marker) for s in malformed)
    ]


def _samples(found: dict[str, list[str]]) -> dict[str, list[str]]:
    """A few ids of each kind of failure that has any, for the report."""
    return {label: ids[:_SAMPLE] for label, ids in found.items() if ids}


async def account(
    session: AsyncSession,
    *,
    tenant_id: uuid.UUID,
    import_ids: Sequence[uuid.UUID],
    sent: Iterable[Sent],
    broker: BrokerView,
    llm_requests: int,
    llm_failed: int,
) -> Accounting:
    """Count every message of the run (see the module docstring)."""
    tables = await _read_tables(session, tenant_id, import_ids)
    records, inbox, products = tables.records, tables.inbox, tables.products
    extra = list(sent)
    ordinary = _ordinary(records, extra)
    conflicts = [s for s in extra if s.conflict]
    malformed = [s for s in extra if s.marker is not None]
    dead_ids = {x.message_id for x in broker.letters if x.reason.value != _CONFLICT}
    stranded_in = Counter(q.queue for q in broker.queued)
    if tables.outbox:
        stranded_in["outbox"] = len(tables.outbox)
    committed = [m for m in ordinary if m in inbox]
    both = [m for m in committed if m in dead_ids]
    stranded, lost = _unfated(ordinary, extra, tables, broker)
    unaccounted = _unaccounted(broker, set(ordinary) | {s.message_id for s in conflicts}, malformed)
    disagreeing = [
        str(message_id)
        for message_id, status, _ in records
        if (status == "done") != (message_id in inbox)
    ]
    committed_ingests = sum(1 for message_id, _, _ in records if message_id in inbox)
    enrich_committed = sum(1 for p in products if f"enrich-{p}" in inbox)
    samples = _samples(
        {
            "lost": lost,
            "stranded": stranded,
            "committed and dead-lettered": both,
            "import records disagreeing with the inbox": disagreeing,
            "unaccounted dead letters": unaccounted,
        }
    )
    return Accounting(
        accepted=len(ordinary) + len(conflicts) + len(malformed),
        committed_once=len(committed),
        dead_lettered=dict(sorted(Counter(x.reason.value for x in broker.letters).items())),
        conflicting=len({x.message_id for x in broker.letters if x.reason.value == _CONFLICT}),
        committed_and_dead_lettered=len(both),
        duplicated=max(len(products) - committed_ingests, 0)
        + max(tables.enriched - len(products), 0),
        records_disagreeing=len(disagreeing),
        unaccounted_letters=len(unaccounted),
        llm_requests=llm_requests,
        llm_failed=llm_failed,
        llm_extra=llm_requests - enrich_committed - llm_failed,
        stranded=len(stranded),
        stranded_in=dict(sorted(stranded_in.items())),
        lost=len(lost),
        samples=samples,
    )
