"""Publishing the outbox: after each commit, and by a relay for what was left behind.

``OutboxPublisher`` sends what requests have just committed. Requests that finish their
transactions at about the same time share one publish: the first starts a batch, the others
join it, and one batch costs one broker round trip (its confirms awaited together) and one
DELETE, however many requests it carries. A request waits for its batch and is answered as
committed whatever happens to it: a broker failure lets the batch's rows go to the relay at
once, a database failure leaves them held until their lease runs out. Its wait is bounded:
at most ``max_answer_wait`` (5 s), and it ends at once when the broker blocks the sender
(a resource alarm); the batch carries on without it, and its rows stay in the outbox until
the broker confirmed them. While the sender is blocked a new batch fails at once and its
rows go to the relay, which waits for the block to clear (it would publish nothing). An
alarm longer than the confirm timeout (30 s) fails the batch in flight and its rows go to
the relay too (RabbitMQ 3.10 dropped such a message with its connection; one it kept
would be published twice, harmless).

The publish itself, the claims and the relay are ``aura.gateway.relay``.

What may still be published twice is written in ``aura.db._outbox``; the inbox makes it
harmless. What is never published twice: a row a live publisher is sending.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from aura.db import Claim, Database, Staged, clear_outbox, delete_sent, release_claim
from aura.gateway.relay import (
    BATCH,
    DEFAULT_LEASE,
    MIN_LEASE,
    STAGED_HOLD,
    publish_claimed,
    publish_stored,
    relay_forever,
    relay_once,
    staging_lease,
    utcnow,
)
from aura.gateway.senders import Sender, is_blocked
from aura.logs import describe_exception

__all__ = [
    "DEFAULT_LEASE",
    "MAX_ANSWER_WAIT",
    "MIN_LEASE",
    "STAGED_HOLD",
    "OutboxPublisher",
    "publish_claimed",
    "publish_stored",
    "relay_forever",
    "relay_once",
    "staging_lease",
]

_DELETES_AT_ONCE = 4
_SENDS_AT_ONCE = 4
MAX_ANSWER_WAIT = 5.0  # the longest a request waits for its batch's confirms
_BLOCKED_POLL = 0.05  # how often a batch in flight looks whether the broker blocked it
_log = structlog.get_logger("aura.gateway.outbox")


@dataclass
class _Waiting:
    messages: list[Staged]
    claim: Claim
    origin: str
    done: asyncio.Future[None]  # the request may be answered
    settled: bool = False  # its batch is over (counted out of the backlog)


class OutboxPublisher:
    """Publishes what requests just committed, many requests per batch (see the module's
    docstring). ``publish`` never raises; it returns once its messages were sent, or were
    left to the relay, or the broker blocked them, or ``max_answer_wait`` passed."""

    def __init__(
        self,
        database: Database,
        sender: Sender,
        *,
        lease: float,
        max_batch: int = BATCH,
        max_sends: int = _SENDS_AT_ONCE,
        now: Callable[[], datetime] = utcnow,
        max_answer_wait: float = MAX_ANSWER_WAIT,
    ) -> None:
        self.database = database
        self.sender = sender
        self.max_answer_wait = max_answer_wait
        self.lease = max(lease, MIN_LEASE)
        self.max_batch = max_batch
        self.now = now
        self.max_sends = max_sends
        self._waiting: list[_Waiting] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sending = 0
        self._sends: set[asyncio.Task[None]] = set()
        self.backlog = 0  # messages handed to ``publish`` and not yet settled
        self.max_backlog = 4 * max_batch
        self._later: set[asyncio.Task[int]] = set()
        self._cleanup: set[asyncio.Task[None]] = set()
        self._deleting = asyncio.Semaphore(_DELETES_AT_ONCE)

    def publish_later(self, message_ids: Sequence[str], claim: Claim, *, origin: str) -> None:
        """Publish a large import's messages in the background (``publish_stored``): the
        request is answered once they are committed. If the process stops first, their
        claim runs out and the relay sends them."""
        task = asyncio.get_running_loop().create_task(
            publish_stored(
                self.database,
                self.sender,
                list(message_ids),
                claim,
                lease=self.lease,
                origin=origin,
                now=self.now,
            )
        )
        self._later.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[int]) -> None:
        self._later.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.warning(
                "publishing a large import failed; the outbox relay will send what is left",
                error=describe_exception(task.exception()),  # type: ignore[arg-type]
            )

    async def publish(self, messages: Sequence[Staged], claim: Claim, *, origin: str) -> None:
        if not messages:
            return
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (tests): the old one's sends are gone
            self._loop, self._sending, self._sends = loop, 0, set()
            self._deleting = asyncio.Semaphore(_DELETES_AT_ONCE)
        waiting = _Waiting(list(messages), claim, origin, loop.create_future())
        self._waiting.append(waiting)
        self.backlog += len(waiting.messages)
        self._pump()
        # A request that stops waiting (cancelled, or past the bound) leaves its messages
        # to the batch, or to the relay: they are committed in the outbox either way.
        await asyncio.wait({waiting.done}, timeout=self.max_answer_wait)

    def _pump(self) -> None:
        """Start a batch of what waits while fewer than ``max_sends`` are in flight."""
        while self._waiting and self._sending < self.max_sends:
            batch: list[_Waiting] = []
            size = 0
            while self._waiting and (
                not batch or size + len(self._waiting[0].messages) <= self.max_batch
            ):
                item = self._waiting.pop(0)
                batch.append(item)
                size += len(item.messages)
            self._sending += 1
            task = asyncio.get_running_loop().create_task(self._send_batch(batch))
            self._sends.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        if task not in self._sends:
            return  # a task of an earlier event loop
        self._sends.discard(task)
        self._sending -= 1
        if not task.cancelled():
            self._pump()

    async def _send_batch(self, batch: list[_Waiting]) -> None:
        try:
            await self._publish(batch)
        except BaseException as exc:  # never lose a waiting request, whatever happened
            _log.warning(
                "publishing after the commit failed; the outbox relay will send what is left",
                origin=",".join(sorted({w.origin for w in batch})),
                messages=sum(len(w.messages) for w in batch),
                error=describe_exception(exc),
            )
            if not isinstance(exc, Exception):
                raise
        finally:
            for item in batch:
                self._settle(item)

    async def _publish(self, batch: list[_Waiting]) -> None:
        if len(batch) == 1 and len(batch[0].messages) > self.max_batch:
            item = batch[0]  # a large import: in parts, renewing its claim as it goes
            await publish_claimed(
                self.database,
                self.sender,
                item.messages,
                item.claim,
                lease=self.lease,
                origin=item.origin,
                now=self.now,
            )
            return
        now = self.now()
        stale = [w for w in batch if w.claim.until - now <= timedelta(seconds=self.lease)]
        for item in stale:  # waited long (a stuck broker): renew as a lone publisher does
            await publish_claimed(
                self.database,
                self.sender,
                item.messages,
                item.claim,
                lease=self.lease,
                origin=item.origin,
                now=self.now,
            )
        live = [w for w in batch if w not in stale]
        messages = [m for w in live for m in w.messages]
        if not messages:
            return
        sent, failure = await self._send_answering(live, messages)
        if failure is None:
            for item in live:  # the broker has them: answer now, delete after
                self._settle(item)
            gate = self._deleting
            await gate.acquire()
            task = asyncio.get_running_loop().create_task(self._delete(sent, gate))
            self._cleanup.add(task)
            task.add_done_callback(self._cleanup.discard)
            return
        async with self.database.session() as session:
            await clear_outbox(session, sent)
            for item in live:  # the relay may send the rest as soon as it likes
                await release_claim(session, item.claim.owner, now=self.now())
            await session.commit()
        _log.warning(
            "publish failed; the outbox relay will send the rest",
            origin=",".join(sorted({w.origin for w in live})),
            sent=len(sent),
            left=len(messages) - len(sent),
            error=describe_exception(failure),
        )

    async def _send_answering(
        self, live: list[_Waiting], messages: list[Staged]
    ) -> tuple[list[str], BaseException | None]:
        """The sender's ``send``; if the broker blocks it meanwhile, ``live``'s requests are
        answered at once (their confirms may be a whole alarm away) and the send goes on."""
        send = asyncio.ensure_future(self.sender.send(messages))
        try:
            while not send.done():
                await asyncio.wait({send}, timeout=_BLOCKED_POLL)
                if not send.done() and is_blocked(self.sender):
                    for item in live:
                        self._answer(item)
        except BaseException:
            send.cancel()  # the batch was cancelled: so is its send, as before
            raise
        return send.result()

    @property
    def congested(self) -> bool:
        """More messages wait to be published than a few batches: the broker is slow."""
        return self.backlog >= self.max_backlog

    def _answer(self, item: _Waiting) -> None:
        if not item.done.done():
            item.done.set_result(None)

    def _settle(self, item: _Waiting) -> None:
        self._answer(item)
        if not item.settled:
            item.settled = True
            self.backlog -= len(item.messages)

    async def _delete(self, sent: Sequence[str], gate: asyncio.Semaphore) -> None:
        """Delete a batch's sent rows; a failure leaves them to the relay (published twice
        then, which the worker's inbox makes harmless)."""
        try:
            await delete_sent(self.database, sent)
        except Exception as exc:
            _log.warning(
                "could not delete published messages from the outbox; the relay will "
                "publish them again when their lease runs out",
                messages=len(sent),
                error=describe_exception(exc),
            )
        finally:
            gate.release()

    async def aclose(self) -> None:
        """Wait for the batches in flight (the rest is the relay's), then close the sender."""
        here = asyncio.get_running_loop()
        pending = {t for t in (*self._sends, *self._later, *self._cleanup) if not t.done()}
        pending = {t for t in pending if t.get_loop() is here}
        if pending:
            _, unfinished = await asyncio.wait(pending, timeout=self.lease)
            for task in unfinished:  # their rows stay claimed until the lease runs out
                task.cancel()
        await self.sender.close()
