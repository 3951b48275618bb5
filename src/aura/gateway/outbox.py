"""Publishing the outbox: after each commit, and by a relay for what was left behind.

``publish_staged`` sends messages the request just committed and deletes each one the
broker confirmed. If the broker is unreachable the request still succeeds (its data and
messages are committed) and the failure is logged; ``relay_once`` (run every
OUTBOX_RELAY_INTERVAL seconds by the gateway, and by ``aura outbox relay``) publishes
messages older than OUTBOX_RELAY_MIN_AGE. A message may be published twice (the relay
and a slow request, or a crash after the publish and before the delete); the worker's
inbox makes that harmless.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import structlog
from celery import Celery
from starlette.concurrency import run_in_threadpool

from aura.db import Database
from aura.db.outbox import Staged, clear_outbox, due_messages

__all__ = ["publish_staged", "relay_forever", "relay_once"]

_log = structlog.get_logger("aura.gateway.outbox")


def _send(publisher: Celery, messages: Sequence[Staged]) -> tuple[list[str], BaseException | None]:
    """Publish in order; stop at the first failure. Returns the ids sent and the failure."""
    sent: list[str] = []
    try:
        for message in messages:
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


async def publish_staged(
    database: Database, publisher: Celery, messages: Sequence[Staged], *, origin: str
) -> int:
    """Publish committed ``messages``, delete the ones sent; returns how many were sent.
    Never raises for a broker failure: what was not sent stays for the relay."""
    if not messages:
        return 0
    sent, failure = await run_in_threadpool(_send, publisher, messages)
    if sent:
        async with database.session() as session:
            await clear_outbox(session, sent)
            await session.commit()
    if failure is not None:
        _log.warning(
            "publish failed; the outbox relay will send the rest",
            origin=origin,
            sent=len(sent),
            left=len(messages) - len(sent),
            error=f"{type(failure).__name__}: {failure}",
        )
    return len(sent)


async def relay_once(
    database: Database,
    publisher: Celery,
    *,
    min_age: float,
    limit: int = 1000,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> int:
    """Publish up to ``limit`` outbox messages older than ``min_age`` seconds."""
    async with database.session() as session:
        due = await due_messages(session, before=now() - timedelta(seconds=min_age), limit=limit)
    if not due:
        return 0
    sent = await publish_staged(database, publisher, due, origin="relay")
    if sent:
        _log.info("outbox relay published messages a failed publish left", sent=sent)
    return sent


async def relay_forever(
    database: Database, publisher: Celery, *, interval: float, min_age: float
) -> None:
    """``relay_once`` every ``interval`` seconds until cancelled; failures are logged."""
    while True:
        try:
            while await relay_once(database, publisher, min_age=min_age) > 0:
                pass  # a backlog: keep going while the broker takes it
        except Exception:
            _log.exception("outbox relay failed; trying again later")
        await asyncio.sleep(interval)
