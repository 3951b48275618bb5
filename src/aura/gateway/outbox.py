"""Publishing the outbox: after each commit, and by a relay for what was left behind.

``publish_claimed`` sends messages its publisher holds a claim on (``aura.db.outbox``) and
deletes each one the broker confirmed. Before each batch it renews its claim and sends only
what it still holds; it renews again whenever half the lease has passed, so a slow publish
of thousands of messages keeps them, and a publisher that stops (crash, broker down) lets
them go when the lease runs out. The request's own publish never raises for a broker
failure: its data and messages are committed, what was not sent stays for the relay.

``relay_once`` (every OUTBOX_RELAY_INTERVAL seconds in the gateway, and ``aura outbox
relay``) claims messages at least OUTBOX_RELAY_MIN_AGE old whose lease ran out, and
publishes them the same way. A publisher holds its rows OUTBOX_RELAY_MIN_AGE at a time.
A request stages its rows held for at least STAGED_HOLD seconds (its own transaction,
thousands of rows, may take a while before it can publish); a request that dies between
its commit and its first renewal delays its messages by that much, never loses them. A
publisher that fails (broker down) lets its rows go at once, for the relay.

What may still be published twice is written in ``aura.db.outbox``; the inbox makes it
harmless. What is never published twice: a row a live publisher is sending.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import structlog
from celery import Celery
from starlette.concurrency import run_in_threadpool

from aura.db import Database
from aura.db.outbox import Claim, Staged, claim_due, clear_outbox, release_claim, renew_claim
from aura.logs import describe_exception

__all__ = [
    "DEFAULT_LEASE",
    "STAGED_HOLD",
    "publish_claimed",
    "relay_forever",
    "relay_once",
    "staging_lease",
]

DEFAULT_LEASE = 30.0
STAGED_HOLD = 60.0
_BATCH = 500
_MIN_LEASE = 1.0
_log = structlog.get_logger("aura.gateway.outbox")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def staging_lease(lease: float) -> float:
    """How long a request holds the rows it stages (see the module's docstring)."""
    return max(lease, STAGED_HOLD)


def _send(
    publisher: Celery, messages: Sequence[Staged], deadline: float, clock: Callable[[], float]
) -> tuple[list[str], BaseException | None]:
    """Publish in order until done, a failure, or ``deadline`` (at least one is tried).
    Returns the ids sent and the failure."""
    sent: list[str] = []
    try:
        for message in messages:
            if sent and clock() >= deadline:
                break  # renew the claim before going on
            publisher.send_task(
                message.task,
                args=message.args,
                kwargs=message.kwargs,
                task_id=message.message_id,
                queue=message.queue,
            )
            sent.append(message.message_id)
    except Exception as exc:  # the broker's many failure types: all mean "not now"
        return sent, exc
    return sent, None


async def publish_claimed(
    database: Database,
    publisher: Celery,
    messages: Sequence[Staged],
    claim: Claim,
    *,
    lease: float,
    origin: str,
    now: Callable[[], datetime] = _utcnow,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Publish the ``messages`` ``claim`` holds, delete the ones sent; returns how many were
    sent. A broker failure is logged, not raised; a database failure is raised (the rows
    stay, the relay takes them when the lease runs out)."""
    pending = list(messages)
    done: list[str] = []  # sent, not yet deleted
    sent_total = lost_total = 0
    failure: BaseException | None = None
    fresh = claim.until - now() > timedelta(seconds=lease)  # a live claim, just made
    while pending and failure is None:
        batch, pending = pending[:_BATCH], pending[_BATCH:]
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
        deadline = clock() + lease / 2
        done, failure = await run_in_threadpool(_send, publisher, batch, deadline, clock)
        sent_total += len(done)
        pending = batch[len(done) :] + pending if failure is None else pending
    if done or failure is not None:
        async with database.session() as session:
            await clear_outbox(session, done)
            if failure is not None:  # not sending them: the relay may, as soon as it likes
                await release_claim(session, claim.owner, now=now())
            await session.commit()
    if lost_total:
        _log.warning(
            "outbox: messages not published by this publisher; its lease ran out and the "
            "relay publishes them",
            origin=origin,
            messages=lost_total,
        )
    if failure is not None:
        _log.warning(
            "publish failed; the outbox relay will send the rest",
            origin=origin,
            sent=sent_total,
            left=len(messages) - sent_total - lost_total,
            error=describe_exception(failure),
        )
    return sent_total


async def relay_once(
    database: Database,
    publisher: Celery,
    *,
    min_age: float,
    lease: float | None = None,
    limit: int = 1000,
    now: Callable[[], datetime] = _utcnow,
) -> int:
    """Claim and publish up to ``limit`` messages staged at least ``min_age`` seconds ago
    that no publisher holds; returns how many were sent. ``lease`` defaults to
    ``min_age`` (at least 1 s)."""
    lease = lease if lease is not None else max(min_age, _MIN_LEASE)
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
    database: Database, publisher: Celery, *, interval: float, min_age: float
) -> None:
    """``relay_once`` every ``interval`` seconds until cancelled; failures are logged."""
    while True:
        try:
            while await relay_once(database, publisher, min_age=min_age) > 0:
                pass  # a backlog: keep going while the broker takes it
        except Exception as exc:
            _log.warning("outbox relay failed; trying again later", error=describe_exception(exc))
        await asyncio.sleep(interval)
