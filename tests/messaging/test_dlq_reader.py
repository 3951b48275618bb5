"""The DLQ reader over kombu's in-memory transport: one entry per fate, whatever the
queue holds (second copies, malformed originals, entries nobody here wrote)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from kombu.connection import Connection
from kombu.message import Message

from aura.events import DeadLetterReason
from aura.messaging.dlq import (
    DeadLetter,
    DeadLetterQueue,
    dead_letter_original,
    publish_dead_letter,
    replay,
)
from aura.messaging.topology import DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, dead_letter_queue


@pytest.fixture
def connection() -> Iterator[Connection]:
    with Connection(f"memory://dlq-{uuid.uuid4().hex}") as conn:
        dead_letter_queue()(conn.default_channel).declare()
        # kombu's memory:// transport shares one queue whatever the URL names: what other
        # tests left there unread would be filed under this reader's name
        dead_letter_queue()(conn.default_channel).purge()
        yield conn
        dead_letter_queue()(conn.default_channel).purge()


def _letter(message_id: str, reason: DeadLetterReason, fingerprint: str = "f1") -> DeadLetter:
    now = datetime.now(UTC)
    return DeadLetter(
        message_id=message_id,
        reason=reason,
        task="t",
        queue="bulk_queue",
        task_args=["a"],
        first_failure_at=now,
        last_failure_at=now,
        fingerprint=fingerprint,
    )


def test_second_copies_of_one_fate_are_counted_once(connection: Connection) -> None:
    reader = DeadLetterQueue(connection)
    for _ in range(3):  # a crash between the confirm and the ack, twice
        publish_dead_letter(connection, _letter("m1", DeadLetterReason.POISON_PILL))
    publish_dead_letter(connection, _letter("m2", DeadLetterReason.POISON_PILL))
    publish_dead_letter(connection, _letter("m2", DeadLetterReason.MAX_RETRIES_EXCEEDED))
    # The same id with two other payloads: two conflicts, not one.
    publish_dead_letter(connection, _letter("m3", DeadLetterReason.CONFLICTING_MESSAGE_ID, "f2"))
    publish_dead_letter(connection, _letter("m3", DeadLetterReason.CONFLICTING_MESSAGE_ID, "f3"))

    letters = reader.list(limit=100)
    assert [(x.message_id, x.reason.value) for x in letters] == [
        ("m1", "poison_pill"),
        ("m2", "poison_pill"),
        ("m2", "max_retries_exceeded"),
        ("m3", "conflicting_message_id"),
        ("m3", "conflicting_message_id"),
    ]
    assert reader.count_by_reason() == {
        "poison_pill": 2,
        "max_retries_exceeded": 1,
        "conflicting_message_id": 2,
    }

    connection.default_channel.queue_declare("bulk_queue")
    report = replay(reader, reason="poison_pill")
    assert [x.message_id for x in report.replayed] == ["m1", "m2"]  # each fate sent once
    channel = connection.default_channel
    sent = []
    while (message := channel.basic_get("bulk_queue", no_ack=True)) is not None:
        sent.append(message.headers["id"])
    assert sent == ["m1", "m2"]
    assert reader.count_by_reason() == {"max_retries_exceeded": 1, "conflicting_message_id": 2}


def test_a_malformed_original_is_kept_byte_for_byte_and_never_replayed(
    connection: Connection,
) -> None:
    body = b"\x80\x04 not json, not utf-8 \xff"
    message = Message(
        body=body,
        content_type="application/x-python-serialize",
        content_encoding="binary",
        headers={"task": "x.y", "id": "m-9", "x-aura-reason": "forged", "retries": 2},
        delivery_info={"routing_key": "bulk_queue"},
    )
    written = dead_letter_original(
        connection, message, kind="content_type", error="pickle is refused", queue="bulk_queue"
    )
    assert written.reason is DeadLetterReason.MALFORMED_MESSAGE

    reader = DeadLetterQueue(connection)
    (letter,) = reader.list(raw=True)
    assert letter.id == written.id
    assert letter.message_id == "m-9"
    assert letter.error_type == "content_type"
    assert letter.error == "pickle is refused"
    assert letter.queue == "bulk_queue"
    assert letter.original is not None
    assert letter.original.raw() == body
    assert letter.original.body == "\\x80\x04 not json, not utf-8 \\xff"  # text, never base64
    assert letter.original.content_type == "application/x-python-serialize"
    assert letter.original.content_encoding == "binary"
    assert letter.original.headers == {"task": "x.y", "id": "m-9", "retries": 2}  # no forgery

    report = replay(reader, reason="malformed_message")
    assert report.replayed == []
    assert [(x.id, "cannot be replayed" in why) for x, why in report.refused] == [(letter.id, True)]
    assert len(reader.list()) == 1  # still there


def test_an_entry_nobody_here_wrote_is_shown_never_fails_the_read(
    connection: Connection,
) -> None:
    with connection.Producer() as producer:
        producer.publish(  # claims to be a letter, is not JSON
            b"{{{",
            exchange=DEAD_LETTER_EXCHANGE,
            routing_key=DEAD_LETTER_QUEUE,
            content_type="application/json",
            content_encoding="utf-8",
            headers={"x-aura-reason": "poison_pill"},
        )
        producer.publish(  # a broker dead letter whose body is not Celery's
            b'"just a string"',
            exchange=DEAD_LETTER_EXCHANGE,
            routing_key=DEAD_LETTER_QUEUE,
            content_type="application/json",
            content_encoding="utf-8",
            headers={"x-death": [{"reason": "rejected", "queue": "bulk_queue", "count": 1}]},
        )
    publish_dead_letter(connection, _letter("m1", DeadLetterReason.POISON_PILL))
    letters = DeadLetterQueue(connection).list()
    assert len(letters) == 3
    unreadable = [x for x in letters if x.error_type == "unreadable_dead_letter"]
    assert len(unreadable) >= 1
    assert all(x.original is not None for x in unreadable)
    assert letters[-1].message_id == "m1"
