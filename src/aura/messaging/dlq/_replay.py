"""Replay: a dead letter sent back to the queue it came from, once, whoever else replays it.

A letter is claimed in the store (one transaction moves it out of ``dead``), published
with a confirm, and marked replayed in that same transaction: replaying twice, or from
two places at once, enqueues it once. A refused letter stays, with the reason."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
from dataclasses import dataclass, field
from typing import Any

from kombu.connection import Connection
from kombu.messaging import Producer
from sqlalchemy import update

from aura.db import Database
from aura.logs import bounded_text, describe_exception
from aura.messaging._dlq_store import DEAD, LISTED, REPLAYED, dead_letters, mark_replayed
from aura.messaging.dlq._filing import letter_of
from aura.messaging.dlq._letter import REPLAY_HEADER, DeadLetter
from aura.messaging.dlq._tasks import ReplayCheck

MAX_REPLAY_BYTES = 32 * 1024 * 1024
"""The largest letter replay sends (the envelope guard's message size limit)."""


@dataclass
class ReplayReport:
    """What ``replay`` did: the letters sent back, and each refused one with the reason."""

    replayed: list[DeadLetter] = field(default_factory=list)
    refused: list[tuple[DeadLetter, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Replay:
    """One replay run's settings: where it publishes, under which source, to which queue
    (None: each letter's own), by whom, with which checks."""

    broker: Connection
    source: str
    to_queue: str | None
    operator: str
    check: ReplayCheck


def _operator() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def _replay_refusal(
    letter: DeadLetter, queue: str, size: int, check: ReplayCheck | None
) -> str | None:
    if letter.original is not None:
        return "a malformed message cannot be replayed: fix its producer and send it again"
    if not queue:
        return "its origin queue is unknown: give one with --to QUEUE"
    if not letter.message_id or not letter.task:
        return "it names no message id or task to replay"
    if size > MAX_REPLAY_BYTES:
        return f"oversized: {size} bytes, more than a message may hold ({MAX_REPLAY_BYTES})"
    return check(letter) if check is not None else None


def _replayed_arguments(row: Any) -> tuple[list[Any], dict[str, Any]]:
    """The arguments to send, whole, from the bytes that landed: a broker-dead-lettered
    message's own body (Aura never rewrote it), else the letter's (redacted when it was
    written)."""
    if row.kind == "broker":
        args, kwargs, _embed = json.loads(bytes(row.body))
        return list(args), dict(kwargs)
    written = DeadLetter.model_validate_json(bytes(row.body))
    return list(written.task_args), dict(written.task_kwargs)


def _queue_missing(broker: Connection, queue: str) -> str | None:
    channel = broker.channel()
    try:
        channel.queue_declare(queue=queue, passive=True)
    except Exception as exc:
        return f"queue {queue!r} does not exist on this broker ({describe_exception(exc)})"
    finally:
        with contextlib.suppress(Exception):
            channel.close()
    return None


def _claimed(row: Any, replay: Replay) -> tuple[DeadLetter, str, str | None]:
    """The claimed row as a letter with its arguments whole, the queue it goes to, and
    why it is refused (None: it may go)."""
    letter = letter_of(row)
    queue = replay.to_queue or letter.queue
    try:
        letter.task_args, letter.task_kwargs = _replayed_arguments(row)  # checks see them whole
    except Exception as exc:
        letter.task_args, letter.task_kwargs = [], {}
        letter.replay_refusal = f"its arguments cannot be read: {type(exc).__name__}"
    refusal = (
        row.refusal
        or letter.replay_refusal
        or _replay_refusal(letter, queue, row.body_size, replay.check)
    )
    if refusal is None:
        refusal = _queue_missing(replay.broker, queue)
    return letter, queue, refusal


async def replay_one(database: Database, seq: int, replay: Replay, report: ReplayReport) -> None:
    """Claim, publish and mark the letter at ``seq``; record it in ``report``."""
    c = dead_letters.c
    async with database.engine.begin() as connection:
        # The claim: a row only one transaction can move out of "dead".
        claimed = await connection.execute(
            update(dead_letters)
            .where(c.seq == seq, c.status == DEAD)
            .values(status=REPLAYED)
            .returning(*LISTED, c.body, c.properties)
        )
        row = claimed.first()
        if row is None:
            return  # another operator replayed it first
        letter, queue, refusal = _claimed(row, replay)
        if refusal is not None:
            await connection.rollback()
            report.refused.append((letter, refusal))
            return
        count = letter.replay_count + 1
        args, kwargs = letter.task_args, letter.task_kwargs
        await asyncio.to_thread(publish_replay, replay.broker, letter, queue, args, kwargs, count)
        await mark_replayed(
            connection,
            seq,
            replay_count=count,
            operator=replay.operator or _operator(),
            to_queue=queue,
            letter_id=letter.id,
            message_id=letter.message_id,
            source=replay.source,
        )
    letter.replay_count = count
    report.replayed.append(letter)


def publish_replay(
    connection: Connection,
    letter: DeadLetter,
    queue: str,
    args: list[Any],
    kwargs: dict[str, Any],
    replay_count: int,
) -> None:
    """Publish ``letter`` as a Celery protocol 2 message straight to ``queue`` (the
    default exchange, so any app's queue works without knowing its bindings) and wait
    for the broker's confirm."""
    message_id = letter.message_id
    headers = {
        "lang": "py",
        "task": letter.task,
        "id": message_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": message_id,
        "parent_id": None,
        "argsrepr": bounded_text(repr(args), 200),
        "kwargsrepr": bounded_text(repr(kwargs), 200),
        "origin": "aura dlq replay",
        "ignore_result": False,
        REPLAY_HEADER: replay_count,
    }
    body = [args, kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    channel = connection.channel()
    try:
        if hasattr(channel, "basic_publish_confirm"):  # py-amqp: wait for the confirm
            channel.basic_publish = channel.basic_publish_confirm
        Producer(channel).publish(
            body,
            exchange="",
            routing_key=queue,
            serializer="json",
            headers=headers,
            delivery_mode="persistent",
            correlation_id=message_id,
            retry=False,
        )
    finally:
        with contextlib.suppress(Exception):
            channel.close()
