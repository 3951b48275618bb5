"""The DLQ pinned where a user would notice a change (found by scripts/mutation.py): what
a dead letter holds and how it goes on the wire, how the reader shows every kind of
entry, its filters and bounds, replay and purge. Over kombu's in-memory transport."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from kombu.connection import Connection
from kombu.message import Message

from aura.events import DeadLetterReason
from aura.messaging.dlq import (
    DeadLetter,
    DeadLetterQueue,
    OriginalMessage,
    dead_letter_original,
    publish_dead_letter,
    purge,
    queue_of,
    replay,
    route_to_dlq,
)
from aura.messaging.dlq._decode import json_safe as _json_safe
from aura.messaging.dlq._letter import error_text as _error_text
from aura.messaging.topology import DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, dead_letter_queue
from tests.helpers import metric


@pytest.fixture
def connection() -> Iterator[Connection]:
    with Connection(f"memory://pins-dlq-{uuid.uuid4().hex}") as conn:
        dead_letter_queue()(conn.default_channel).declare()
        # kombu's memory:// transport shares one state whatever the URL names: start empty.
        dead_letter_queue()(conn.default_channel).purge()
        yield conn
        dead_letter_queue()(conn.default_channel).purge()


def raw_entries(connection: Connection) -> list[Any]:
    """Every message in the DLQ, removed (the test reads the wire, not the reader)."""
    queue = dead_letter_queue()(connection.default_channel)
    found = []
    while (message := queue.get(no_ack=True, accept=["json"])) is not None:
        found.append(message)
    return found


def letter(message_id: str, reason: DeadLetterReason, **fields: Any) -> DeadLetter:
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "message_id": message_id,
        "reason": reason,
        "task": "pins.task",
        "queue": "bulk_queue",
        "first_failure_at": now,
        "last_failure_at": now,
    }
    return DeadLetter(**(values | fields))


async def test_route_to_dlq_writes_a_redacted_letter_and_counts_it(
    connection: Connection,
) -> None:
    before = metric("messages_sent_to_dlq_total", reason="max_retries_exceeded")
    first = datetime(2026, 1, 1, tzinfo=UTC)
    written = await route_to_dlq(
        "m-1",
        "max_retries_exceeded",
        connection=connection,
        task="pins.task",
        queue="bulk_queue",
        args=("a", "postgresql://u:hunter2@db/x"),
        kwargs={"password": "hunter2", "n": 1},
        error=ConnectionError("refused\n  twice"),
        retries=3,
        first_failure_at=first,
        tenant_id="t-1",
        fingerprint="f-1",
    )
    assert metric("messages_sent_to_dlq_total", reason="max_retries_exceeded") == before + 1
    assert written.reason is DeadLetterReason.MAX_RETRIES_EXCEEDED
    assert (written.task, written.queue, written.retries) == ("pins.task", "bulk_queue", 3)
    assert (written.error_type, written.error) == ("ConnectionError", "refused twice")
    assert written.first_failure_at == first
    assert written.last_failure_at > first
    assert (written.tenant_id, written.fingerprint) == ("t-1", "f-1")
    assert "hunter2" not in json.dumps(written.model_dump(mode="json"))
    assert written.task_args[0] == "a"
    assert written.task_kwargs["n"] == 1
    (message,) = raw_entries(connection)
    assert message.headers == {"x-aura-reason": "max_retries_exceeded", "x-aura-task": "pins.task"}
    assert message.properties["message_id"] == written.id
    assert message.properties["delivery_mode"] == 2
    assert DeadLetter.model_validate(json.loads(message.body)) == written


async def test_route_to_dlq_defaults(connection: Connection) -> None:
    written = await route_to_dlq(
        "m-2", DeadLetterReason.POISON_PILL, connection=connection, error_text="bad json"
    )
    assert (written.task, written.queue, written.task_args, written.task_kwargs) == (
        "",
        "",
        [],
        {},
    )
    assert (written.error_type, written.error, written.retries) == ("", "bad json", 0)
    assert written.first_failure_at == written.last_failure_at
    assert written.tenant_id is None
    assert written.fingerprint is None


def test_error_texts_are_one_line_cut_to_1000() -> None:
    assert _error_text(None, ValueError("a\n b")) == "a b"
    assert _error_text("given", ValueError("ignored")) == "given"
    assert _error_text(None, None) == ""
    assert len(_error_text("x" * 5000, None)) == 1000
    assert _error_text("y " * 3000, None).startswith("y y")

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError

    assert _error_text(None, Unprintable()) == "<unprintable Unprintable>"


def test_header_values_become_json() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert _json_safe(
        {
            "none": None,
            "flag": True,
            "n": 3,
            "s": "x",
            "f": 1.5,
            "nan": float("nan"),
            "inf": float("-inf"),
            "b": b"\xffok",
            "at": when,
            "d": Decimal("1.10"),
            1: ("t", ["l"]),
            "other": frozenset(),
        }
    ) == {
        "none": None,
        "flag": True,
        "n": 3,
        "s": "x",
        "f": 1.5,
        "nan": "nan",
        "inf": "-inf",
        "b": "\\xffok",
        "at": "2026-01-02T03:04:05+00:00",
        "d": "1.10",
        "1": ["t", ["l"]],
        "other": "frozenset()",
    }
    deep: Any = "leaf"
    for _ in range(8):
        deep = [deep]
    assert _json_safe(deep) == deep  # eight levels: kept
    assert _json_safe([deep]) == [[[[[[[[["<nested too deep>"]]]]]]]]]


def test_queue_of_a_delivery() -> None:
    delayed = ".".join("0000000000000000000000000101") + ".bulk_queue"  # 28 delay bits
    assert queue_of({"routing_key": delayed}) == "bulk_queue"
    assert queue_of({"routing_key": "shop.orders"}) == "shop.orders"  # dots of its own
    assert queue_of({"routing_key": "realtime_queue"}) == "realtime_queue"
    assert queue_of(None) == ""
    assert queue_of({}) == ""


def test_a_malformed_original_on_the_wire(connection: Connection) -> None:
    message = Message(
        body="text body",
        content_type=None,
        content_encoding=None,
        headers={
            "task": "t" * 300,
            "id": "not an id!",
            "compression": "application/x-gzip",
            "x-aura-kind": "forged",
            "keep": 1,
        },
    )
    before = metric("messages_sent_to_dlq_total", reason="conflicting_message_id")
    written = dead_letter_original(
        connection,
        message,
        kind="unknown_task",
        error="no such\ntask",
        queue="bulk_queue",
        reason=DeadLetterReason.CONFLICTING_MESSAGE_ID,
    )
    assert metric("messages_sent_to_dlq_total", reason="conflicting_message_id") == before + 1
    assert written.message_id == ""  # not a valid id: never echoed
    assert written.task == "t" * 200
    assert (written.error_type, written.error, written.queue) == (
        "unknown_task",
        "no such task",
        "bulk_queue",
    )
    assert written.reason is DeadLetterReason.CONFLICTING_MESSAGE_ID
    assert written.first_failure_at == written.dead_lettered_at
    (raw,) = raw_entries(connection)
    assert raw.body == b"text body"
    assert raw.content_type == "application/octet-stream"
    assert raw.content_encoding == "binary"
    assert raw.properties["message_id"] == written.id
    headers = raw.headers
    assert "compression" not in headers
    assert headers["x-aura-original-compression"] == "application/x-gzip"
    assert headers["x-aura-kind"] == "unknown_task"
    assert headers["x-aura-format"] == "original"
    assert headers["x-aura-reason"] == "conflicting_message_id"
    assert headers["x-aura-error"] == "no such task"
    assert headers["x-aura-queue"] == "bulk_queue"
    assert headers["x-aura-original-content-type"] == ""
    assert headers["keep"] == 1
    assert datetime.fromisoformat(headers["x-aura-dead-lettered-at"]) == written.dead_lettered_at


def test_the_reader_shows_a_malformed_original_as_it_came(connection: Connection) -> None:
    message = Message(
        body="caf\u00e9",
        content_type="text/plain",
        content_encoding="utf-8",
        headers={"id": "m-5", "task": "x.y", "compression": "zlib", "x-death": [{"count": 1}]},
    )
    dead_letter_original(connection, message, kind="not_json", error="e", queue="q")
    (shown,) = DeadLetterQueue(connection).list(raw=True)
    assert shown.message_id == "m-5"
    assert shown.task == "x.y"
    assert shown.reason is DeadLetterReason.MALFORMED_MESSAGE
    assert shown.original is not None
    assert (
        shown.original.model_dump()
        == OriginalMessage(
            body="caf\u00e9",
            size=5,
            content_type="text/plain",
            content_encoding="utf-8",
            headers={"id": "m-5", "task": "x.y", "compression": "zlib"},
        ).model_dump()
    )
    assert shown.original.raw() == "caf\u00e9".encode()


def publish_raw(connection: Connection, body: bytes, headers: dict[str, Any]) -> None:
    with connection.Producer() as producer:
        producer.publish(
            body,
            exchange=DEAD_LETTER_EXCHANGE,
            routing_key=DEAD_LETTER_QUEUE,
            content_type="application/json",
            content_encoding="utf-8",
            headers=headers,
        )


def test_an_original_with_a_bad_date_or_reason_is_still_shown(connection: Connection) -> None:
    publish_raw(
        connection,
        b"{}",
        {
            "x-aura-format": "original",
            "x-aura-reason": "made up!",  # not a reason's shape (a rule's own is snake_case)
            "x-aura-dead-lettered-at": "yesterday",
            "x-aura-queue": "q" * 300,
            "x-aura-error": "e" * 2000,
        },
    )
    before = datetime.now(UTC)
    (shown,) = DeadLetterQueue(connection).list()
    assert shown.reason is DeadLetterReason.MALFORMED_MESSAGE
    assert shown.dead_lettered_at >= before
    assert shown.queue == "q" * 200
    assert shown.error == "e" * 1000


def test_broker_dead_letters_worker_lost_and_task_failed(connection: Connection) -> None:
    died = datetime(2026, 3, 1, tzinfo=UTC)
    body = json.dumps([[1, "a"], {"k": "v"}, {}]).encode()
    publish_raw(
        connection,
        body,
        {
            "id": "m-lost",
            "task": "x.lost",
            "x-first-death-reason": "delivery_limit",
            "x-death": [{"reason": "delivery_limit", "queue": "bulk_queue", "count": 5}],
        },
    )
    publish_raw(
        connection,
        body,
        {"id": "m-failed", "task": "x.failed", "x-death": [{"reason": "rejected", "time": died}]},
    )
    publish_raw(connection, b"[1, 2]", {"id": "m-odd"})  # no x-death, not Celery's shape
    lost, failed, odd = DeadLetterQueue(connection).list(raw=True)
    assert (lost.reason, lost.error_type, lost.retries) == (
        DeadLetterReason.WORKER_LOST,
        "WorkerLost",
        5,
    )
    assert (lost.message_id, lost.id, lost.task, lost.queue) == (
        "m-lost",
        "m-lost",
        "x.lost",
        "bulk_queue",
    )
    assert (lost.task_args, lost.task_kwargs) == ([1, "a"], {"k": "v"})
    assert lost.error == "dead-lettered by the broker: delivery_limit"
    assert (failed.reason, failed.error_type, failed.retries) == (
        DeadLetterReason.TASK_FAILED,
        "Rejected",
        0,
    )
    assert failed.error == "dead-lettered by the broker: rejected"
    assert failed.first_failure_at == died
    # not Celery's (args, kwargs, embed): kept as it came, shown, never replayed
    assert odd.reason is DeadLetterReason.MALFORMED_MESSAGE
    assert odd.error_type == "unreadable_dead_letter"
    assert odd.original is not None
    assert odd.original.raw() == b"[1, 2]"
    assert odd.replay_refusal is not None


def test_the_readers_filters_limit_and_pages(connection: Connection) -> None:
    reader = DeadLetterQueue(connection)
    publish_dead_letter(connection, letter("m1", DeadLetterReason.POISON_PILL, tenant_id="t1"))
    publish_dead_letter(
        connection, letter("m2", DeadLetterReason.POISON_PILL, task="other", tenant_id="t2")
    )
    publish_dead_letter(connection, letter("m3", DeadLetterReason.MAX_RETRIES_EXCEEDED))

    def ids(found: list[DeadLetter]) -> list[str]:
        return [x.message_id for x in found]

    assert ids(reader.list()) == ["m1", "m2", "m3"]
    assert ids(reader.list(reason="poison_pill")) == ["m1", "m2"]
    assert ids(reader.list(task="pins.task")) == ["m1", "m3"]
    assert ids(reader.list(tenant="t2")) == ["m2"]
    assert ids(reader.list(reason="poison_pill", task="pins.task", tenant="t1")) == ["m1"]
    assert ids(reader.list(reason="poison_pill", tenant="t9")) == []
    assert ids(reader.list(limit=2)) == ["m1", "m2"]
    first, second, third = reader.list()
    assert ids(reader.list(after=first.seq)) == ["m2", "m3"]
    assert ids(reader.list(after=second.seq, limit=1)) == ["m3"]
    assert reader.count() == 3
    assert reader.count(reason="poison_pill", tenant="t2") == 1
    assert reader.show(third.id) == third
    assert reader.show("no-such-letter") is None
    assert reader.show(third.id) == third  # a read is a read: it takes nothing
    assert ids(reader.list()) == ["m1", "m2", "m3"]  # nor moves anything


def test_replay_needs_a_target_and_sends_only_what_matches(connection: Connection) -> None:
    reader = DeadLetterQueue(connection)
    with pytest.raises(ValueError, match="needs a dead letter id or a reason"):
        replay(reader)
    connection.default_channel.queue_declare("pins_q")
    publish_dead_letter(connection, letter("m1", DeadLetterReason.POISON_PILL, queue="pins_q"))
    publish_dead_letter(connection, letter("m2", DeadLetterReason.POISON_PILL, queue="pins_q"))
    target = reader.list()[1]
    report = replay(reader, letter_id=target.id, operator="pins")
    assert [x.message_id for x in report.replayed] == ["m2"]
    assert report.replayed[0].replay_count == 1
    assert [x.message_id for x in reader.list()] == ["m1"]
    assert [(r["letter_id"], r["operator"], r["to_queue"]) for r in reader.replays()] == [
        (target.id, "pins", "pins_q")
    ]
    sent = connection.default_channel.basic_get("pins_q", no_ack=True)
    assert sent.headers["id"] == "m2"
    assert sent.headers["aura_replay_count"] == 1
    assert replay(reader, letter_id=target.id).replayed == []  # once: it is replayed
    assert connection.default_channel.basic_get("pins_q", no_ack=True) is None

    refused = replay(reader, reason="poison_pill", to_queue="no_such_queue")
    assert len(refused.refused) == 1
    assert "no_such_queue" in refused.refused[0][1]
    assert [x.message_id for x in reader.list()] == ["m1"]  # refused: it stays


def test_purge_removes_only_its_reason(connection: Connection) -> None:
    reader = DeadLetterQueue(connection)
    publish_dead_letter(connection, letter("m1", DeadLetterReason.POISON_PILL))
    publish_dead_letter(connection, letter("m2", DeadLetterReason.WORKER_LOST))
    publish_dead_letter(connection, letter("m1", DeadLetterReason.POISON_PILL))
    assert purge(reader, reason="poison_pill") == 1  # two copies, one letter
    assert [x.message_id for x in reader.list()] == ["m2"]
    assert reader.count_by_reason() == {"worker_lost": 1}


def test_fate_keys() -> None:
    named = letter("m1", DeadLetterReason.POISON_PILL, fingerprint="f")
    assert named.fate_key == ("m1", "poison_pill", "f")
    anonymous = letter("", DeadLetterReason.TASK_FAILED)
    assert anonymous.fate_key == (f"letter:{anonymous.id}", "task_failed", "")
    assert letter("m", DeadLetterReason.POISON_PILL).dead_lettered_at - datetime.now(
        UTC
    ) < timedelta(seconds=60)


def test_the_error_window_is_2000_characters_before_whitespace_is_folded() -> None:
    assert _error_text(" " * 1500 + "x" * 2000, None) == "x" * 500


def test_letters_not_written_by_route_to_dlq_count_no_retries(connection: Connection) -> None:
    message = Message(body=b"x", content_type="text/plain", content_encoding="utf-8", headers={})
    written = dead_letter_original(connection, message, kind="not_json", error="e", queue="q")
    assert written.retries == 0
    (shown,) = DeadLetterQueue(connection).list()
    assert shown.retries == 0
    now = datetime.now(UTC)
    bare = DeadLetter(
        message_id="m",
        reason="poison_pill",
        task="t",
        queue="q",
        first_failure_at=now,
        last_failure_at=now,
    )
    assert (bare.retries, bare.error, bare.error_type, bare.task_args) == (0, "", "", [])


def test_dead_letters_are_published_with_retries_and_keep_their_encoding(
    connection: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kombu.messaging import Producer

    calls: list[dict[str, Any]] = []
    real = Producer.publish

    def recording(self: Producer, body: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(self, body, **kwargs)

    monkeypatch.setattr(Producer, "publish", recording)
    publish_dead_letter(connection, letter("m1", DeadLetterReason.POISON_PILL))
    message = Message(
        body=b"{", content_type="application/json", content_encoding="utf-8", headers={}
    )
    dead_letter_original(connection, message, kind="not_json", error="e", queue="q")
    policy = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5}
    assert [(c["retry"], c["retry_policy"]) for c in calls] == [(True, policy)] * 2
    assert [c["delivery_mode"] for c in calls] == ["persistent"] * 2
    _, original = raw_entries(connection)
    assert (original.content_type, original.content_encoding) == ("application/json", "utf-8")


def test_nested_header_tables_are_cut_at_eight_levels() -> None:
    deep: Any = "leaf"
    for _ in range(8):
        deep = {"k": deep}
    assert _json_safe(deep) == deep
    cut = _json_safe({"k": deep})
    for _ in range(9):
        cut = cut["k"] if isinstance(cut, dict) else cut
    assert cut == "<nested too deep>"


def test_the_reader_declares_the_dlq_and_files_every_kind() -> None:
    with Connection(f"memory://pins-dlq-{uuid.uuid4().hex}") as connection:
        reader = DeadLetterQueue(connection)
        assert reader.list() == []
        channel = connection.default_channel
        channel.queue_declare(DEAD_LETTER_QUEUE, passive=True)  # the reader declared it
        publish_dead_letter(connection, letter("m1", DeadLetterReason.POISON_PILL))
        publish_raw(connection, b"[[], {}, {}]", {"id": "m2", "task": "t", "x-death": [{}]})
        assert [x.message_id for x in reader.list()] == ["m1", "m2"]
        assert channel.basic_get(DEAD_LETTER_QUEUE, no_ack=True) is None  # all filed


def test_an_entry_kombu_cannot_build_is_kept_and_shown(connection: Connection) -> None:
    publish_raw(connection, b"not gzip", {"compression": "application/x-gzip"})
    publish_dead_letter(connection, letter("m1", DeadLetterReason.POISON_PILL))
    odd, shown = DeadLetterQueue(connection).list(raw=True)
    assert shown.message_id == "m1"
    assert odd.original is not None
    assert odd.original.raw() == b"not gzip"  # as it came, never inflated


def test_the_readers_defaults(connection: Connection) -> None:
    for n in range(51):
        publish_dead_letter(connection, letter(f"m{n}", DeadLetterReason.POISON_PILL))
    assert len(DeadLetterQueue(connection).list()) == 50
    assert DeadLetterQueue(connection).count_by_reason() == {"poison_pill": 51}


def test_each_read_closes_its_channel(connection: Connection) -> None:
    publish_dead_letter(connection, letter("m1", DeadLetterReason.POISON_PILL))
    reader = DeadLetterQueue(connection)
    reader.list()
    open_channels = len(connection.transport.channels)
    for _ in range(3):
        reader.list()
        reader.count_by_reason()
    assert len(connection.transport.channels) == open_channels  # none left open


def test_each_read_declares_the_dlq_first(
    connection: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a fresh RabbitMQ the queue may not exist yet: reading it would be a 404."""
    from kombu import Queue

    declared: list[str] = []
    real = Queue.declare

    def recording(self: Queue, *args: Any, **kwargs: Any) -> Any:
        declared.append(self.name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Queue, "declare", recording)
    DeadLetterQueue(connection).list()
    assert declared == [DEAD_LETTER_QUEUE]
