"""The inbox pinned where a user would notice a change (found by scripts/mutation.py):
each verdict of ``claim_message`` by fingerprint, ``already_processed`` and the read
side ``DatabaseInbox``, on PostgreSQL and SQLite."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from aura.db import Database, DatabaseInbox, ProcessedMessage, already_processed, claim_message
from aura.errors import ConflictingMessageIdError, InvalidInputError
from aura.message_id import InboxEntry


async def claim(database: Database, message_id: str, fingerprint: str | None) -> bool:
    async with database.session() as session:
        claimed = await claim_message(session, message_id, task="pins", fingerprint=fingerprint)
        await session.commit()
        return claimed


async def test_the_first_claim_is_true_and_the_row_holds_what_was_claimed(
    database: Database,
) -> None:
    message_id = str(uuid.uuid4())
    tenant = uuid.uuid4()
    async with database.session() as session:
        claimed = await claim_message(
            session, message_id, task="ingest", tenant_id=tenant, fingerprint="f-1"
        )
        assert claimed is True
        await session.rollback()  # rolled back with the effect: nothing was claimed
    assert await claim(database, message_id, "f-1") is True
    async with database.session() as session:
        row = await session.scalar(
            select(ProcessedMessage).where(ProcessedMessage.message_id == message_id)
        )
    assert row is not None
    assert (row.task, row.fingerprint) == ("pins", "f-1")


async def test_each_redelivery_verdict_by_fingerprint(database: Database) -> None:
    same, legacy, unknown = (str(uuid.uuid4()) for _ in range(3))
    assert await claim(database, same, "f-1") is True
    assert await claim(database, same, "f-1") is False  # a redelivery: skip the effect
    assert await claim(database, same, None) is False  # the caller knows no fingerprint
    with pytest.raises(ConflictingMessageIdError) as conflict:
        await claim(database, same, "f-2")
    assert conflict.value.field == "message_id"
    assert str(conflict.value) == (
        f"message id {same} was committed for another payload (stored f-1, this one f-2)"
    )
    assert await claim(database, legacy, None) is True  # a row kept before fingerprints
    assert await claim(database, legacy, "f-9") is False  # matches any payload
    assert await claim(database, unknown, None) is True


async def test_already_processed_and_the_read_side(database: Database) -> None:
    done, pending, legacy = (str(uuid.uuid4()) for _ in range(3))
    await claim(database, done, "f-1")
    await claim(database, legacy, None)
    async with database.session() as session:
        assert await already_processed(session, done) is True
        assert await already_processed(session, pending) is False
    inbox = DatabaseInbox(lambda: database)
    assert await inbox.lookup(done) == InboxEntry(fingerprint="f-1")
    assert await inbox.lookup(legacy) == InboxEntry(fingerprint=None)
    assert await inbox.lookup(pending) is None


async def test_bad_message_ids_are_refused_before_any_query(database: Database) -> None:
    inbox = DatabaseInbox(lambda: database)
    async with database.session() as session:
        with pytest.raises(InvalidInputError, match="message id"):
            await claim_message(session, "", task="pins")
        with pytest.raises(InvalidInputError, match="message id"):
            await already_processed(session, "a b")
    with pytest.raises(InvalidInputError, match="message id"):
        await inbox.lookup("x" * 1000)
