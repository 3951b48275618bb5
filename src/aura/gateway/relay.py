"""Publishing rows a publisher holds a claim on (``aura.db._outbox``), and the relay that
takes over what no one holds. ``aura.gateway.outbox`` publishes each request's rows with it.

``publish_claimed`` sends messages its publisher holds a claim on (``aura.db._outbox``) and
deletes each one the broker confirmed. Before each batch it renews its claim and sends only
what it still holds; it renews again whenever half the lease has passed, so a slow publish
of thousands of messages keeps them, and a publisher that stops (crash, broker down) lets
them go when the lease runs out.

``relay_once`` (every OUTBOX_RELAY_INTERVAL seconds in the gateway, and ``aura outbox
relay``) claims messages at least OUTBOX_RELAY_MIN_AGE old whose lease ran out, and
publishes them the same way. A publisher holds its rows OUTBOX_RELAY_MIN_AGE at a time,
and at least MIN_LEASE (10 s): it renews its claim every half lease, so the lease must
outlast the longest stall between two renewals (one confirmed send, a slow transaction on a
loaded host). With a 1 s lease, a 5,000-message import on a host at load 14 was published
twice in part; OUTBOX_RELAY_MIN_AGE says when the relay may look, not how long a live
publisher's stall may be.
A request stages its rows held for at least STAGED_HOLD seconds (its own transaction,
thousands of rows, may take a while before it can publish); a request that dies between
its commit and its first renewal delays its messages by that much, never loses them. A
publisher that fails (broker down) lets its rows go at once, for the relay.

What may still be published twice is written in ``aura.db._outbox``; the inbox makes it
harmless.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import structlog
from celery import Celery

from aura.db import (
    Claim,
    Database,
    Staged,
    claim_due,
    clear_outbox,
    extend_claim,
    release_claim,
    renew_claim,
    take_held,
)
from aura.gateway.senders import Sender, is_blocked, sender_for
from aura.logs import describe_exception

__all__ = [
    "BATCH",
    "DEFAULT_LEASE",
    "MIN_LEASE",
    "STAGED_HOLD",
    "publish_claimed",
    "publish_stored",
    "relay_forever",
    "relay_once",
    "staging_lease",
    "utcnow",
]

DEFAULT_LEASE = 30.0
STAGED_HOLD = 60.0
BATCH = 500  # messages per send (one claim renewal, one broker round trip)
MIN_LEASE = 10.0
_log = structlog.get_logger("aura.gateway.outbox")


def utcnow() -> datetime:
    return datetime.now(UTC)


def staging_lease(lease: float) -> float:
    """How long a request holds the rows it stages (see the module's docstring)."""
    return max(lease, STAGED_HOLD)


async def publish_claimed(
    database: Database,
    publisher: Celery | Sender,
    messages: Sequence[Staged],
    claim: Claim,
    *,
    lease: float,
    origin: str,
    now: Callable[[], datetime] = utcnow,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Publish the ``messages`` ``claim`` holds, delete the ones sent; returns how many were
    sent. A broker failure is logged, not raised; a database failure is raised (the rows
    stay, the relay takes them when the lease runs out)."""
    sender = sender_for(publisher)
    pending = list(messages)
    done: list[str] = []  # sent, not yet deleted
    sent_total = lost_total = 0
    failure: BaseException | None = None
    fresh = claim.until - now() > timedelta(seconds=lease)  # a live claim, just made
    while pending and failure is None:
        batch, pending = pending[:BATCH], pending[BATCH:]
        if fresh and len(batch) == len(messages):  # all of it, under a claim with time to
            held = {m.message_id for m in batch}  # spare: no round trip to renew it
        else:
            renewed = Claim(claim.owner, now() + timedelta(seconds=lease))
            async with database.session() as session:
                if done:
                    await clear_outbox(session, done)
                ids = [m.message_id for m in batch]
                held = await renew_claim(session, renewed, ids, now=now())
                await session.commit()
        done = []
        lost_total += len(batch) - len(held)
        batch = [m for m in batch if m.message_id in held]
        if not batch:
            continue
        done, failure = await sender.send(batch, deadline=clock() + lease / 2)
        sent_total += len(done)
        if failure is None and len(done) < len(batch):  # the deadline cut it: renew first
            sent = set(done)
            pending = [m for m in batch if m.message_id not in sent] + pending
    await _finish(
        database,
        claim,
        done,
        failure,
        now=now,
        origin=origin,
        sent=sent_total,
        left=len(messages) - sent_total - lost_total,
        lost=lost_total,
    )
    return sent_total


async def publish_stored(
    database: Database,
    publisher: Celery | Sender,
    message_ids: Sequence[str],
    claim: Claim,
    *,
    lease: float,
    origin: str,
    now: Callable[[], datetime] = utcnow,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """``publish_claimed`` for messages known only by id (a large import: its rows are not
    held in memory). Each part is read from the outbox as its claim is renewed, sent, and
    deleted with the next part's read; the claim on all the rest is extended at the start
    and every half lease, in one statement. Returns how many were sent."""
    sender = sender_for(publisher)
    done: list[str] = []
    sent_total = lost_total = 0
    failure: BaseException | None = None
    parts = [message_ids[i : i + BATCH] for i in range(0, len(message_ids), BATCH)]
    extended = -lease  # the whole import's claim is extended at once, then every half lease
    while parts and failure is None:
        ids = parts.pop(0)
        renewed = Claim(claim.owner, now() + timedelta(seconds=lease))
        async with database.session() as session:
            if done:
                await clear_outbox(session, done)
            if clock() - extended >= lease / 2:
                await extend_claim(session, renewed, now=now())
                extended = clock()
            batch = await take_held(session, renewed, ids, now=now())
            await session.commit()
        done = []
        lost_total += len(ids) - len(batch)
        if not batch:
            continue
        done, failure = await sender.send(batch, deadline=clock() + lease / 2)
        sent_total += len(done)
        if failure is None and len(done) < len(batch):  # the deadline cut it: renew first
            sent = set(done)
            parts.insert(0, [m.message_id for m in batch if m.message_id not in sent])
    await _finish(
        database,
        claim,
        done,
        failure,
        now=now,
        origin=origin,
        sent=sent_total,
        left=len(message_ids) - sent_total - lost_total,
        lost=lost_total,
    )
    return sent_total


async def _finish(
    database: Database,
    claim: Claim,
    done: Sequence[str],
    failure: BaseException | None,
    *,
    now: Callable[[], datetime],
    origin: str,
    sent: int,
    left: int,
    lost: int,
) -> None:
    """The end of a publish: delete what the broker confirmed last; after a failure let
    the claim go (the relay may send the rest as soon as it likes); say what happened."""
    if done or failure is not None:
        async with database.session() as session:
            await clear_outbox(session, done)
            if failure is not None:
                await release_claim(session, claim.owner, now=now())
            await session.commit()
    if lost:
        _log.warning(
            "outbox: messages not published by this publisher; its lease ran out and the "
            "relay publishes them",
            origin=origin,
            messages=lost,
        )
    if failure is not None:
        _log.warning(
            "publish failed; the outbox relay will send the rest",
            origin=origin,
            sent=sent,
            left=left,
            error=describe_exception(failure),
        )


async def relay_once(
    database: Database,
    publisher: Celery | Sender,
    *,
    min_age: float,
    lease: float | None = None,
    limit: int = 1000,
    now: Callable[[], datetime] = utcnow,
) -> int:
    """Claim and publish up to ``limit`` messages staged at least ``min_age`` seconds ago
    that no publisher holds; returns how many were sent. ``lease`` defaults to
    ``min_age`` (at least MIN_LEASE)."""
    lease = lease if lease is not None else max(min_age, MIN_LEASE)
    claim = Claim.new(lease, now())
    async with database.session() as session:
        due = await claim_due(
            session,
            claim,
            now=now(),
            staged_before=now() - timedelta(seconds=min_age),
            limit=limit,
        )
        await session.commit()
    if not due:
        return 0
    _log.info(
        "outbox relay took over messages no publisher holds (a failed or crashed publish)",
        messages=len(due),
    )
    return await publish_claimed(
        database, publisher, due, claim, lease=lease, origin="relay", now=now
    )


async def relay_forever(
    database: Database, publisher: Celery | Sender, *, interval: float, min_age: float
) -> None:
    """``relay_once`` every ``interval`` seconds until cancelled (not while the broker blocks
    ``publisher``: nothing would be sent); failures are logged."""
    sender = sender_for(publisher)
    while True:
        try:
            while not is_blocked(sender) and await relay_once(database, sender, min_age=min_age):
                pass  # a backlog: keep going while the broker takes it
        except Exception as exc:
            _log.warning("outbox relay failed; trying again later", error=describe_exception(exc))
        await asyncio.sleep(interval)
