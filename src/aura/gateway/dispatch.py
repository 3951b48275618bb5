"""Fair dispatch: an import's records wait in the outbox, not in the broker's queue, and go
out a fair share per tenant at a time.

Why here. RabbitMQ's queues are FIFO and know nothing of tenants: once a 20,000-record
import is published, a small tenant's 10 records wait behind all of it (measured: 25 s at
5 s after the big import was posted, 95 s at 40 s; issue 29). So a held import's rows stay
in the outbox (staged under ``aura.db.HELD``) and every gateway's ``Dispatcher`` keeps each
work queue only about OUTBOX_DISPATCH_DEPTH messages deep:

    every OUTBOX_DISPATCH_INTERVAL (0.25 s), or at once when this gateway held an import:
      backlog  = held rows by (queue, tenant)                   one GROUP BY
      depth    = max(OUTBOX_DISPATCH_DEPTH, what this dispatcher released to the queue
                 in the last LEAD_WINDOW seconds / LEAD_WINDOW * LEAD): about half a
                 second of the fleet's work, however fast or slow it is (the workers'
                 prefetch holds more: the ready messages only need to outlast a round)
      room     = depth - ready messages on the queue            one passive declare each
                 (bulk_queue: also depth - realtime_queue's: an ingest queues an
                 enrichment, so ingests never run ahead of what the LLM can follow)
      quotas   = FairShare(TENANT_WEIGHTS).quotas(backlog, room)  deficit round robin
      claim each tenant's oldest quota rows and publish them (``publish_claimed``)

A small tenant's work is then about half a second behind anyone's (the ready messages
ahead of it), plus what the workers hold (their prefetch: N per queue per worker), where
the pool's slots go by tenant as well (``aura.messaging.pool``). Why adaptive: a fixed 200
was 3 s of queue per stage for a fleet doing 70 records/s (a small import waited 8.4 s),
and too shallow to keep a fast one busy; the measured rate can grow 8-fold a second (a
round may release its whole depth), so a fleet's burst is followed within a second.

Several gateways each dispatch: the claim takes rows with ``FOR UPDATE SKIP LOCKED``, so no
row goes out twice, and together they may fill a queue to a few times its depth, never
without bound.

What is kept: every row is published by ``publish_claimed`` under a lease, as the relay's
are (``aura.gateway.relay``): a dispatcher that dies mid-publish leaves its rows to the
relay when the lease runs out; a publish that fails puts its rows back on hold. The inbox
makes a message published twice harmless, as ever.

TENANT_SCHEDULING=fifo holds nothing (each import is published by its request, in arrival
order): the baseline ``bench/fairness.py`` compares against.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime

import structlog
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from aura.db import HELD, Claim, Database, OutboxMessage, claim_held, held_backlog
from aura.gateway.relay import MIN_LEASE, publish_claimed, utcnow
from aura.gateway.senders import Sender, is_blocked
from aura.logs import describe_exception
from aura.metrics import AURA_OUTBOX_HELD, AURA_OUTBOX_HELD_TENANTS
from aura.tenancy import FairShare

__all__ = ["DEFAULT_DEPTH", "DEFAULT_INTERVAL", "LEAD", "LEAD_WINDOW", "Dispatcher"]

DEFAULT_DEPTH = 50
DEFAULT_INTERVAL = 0.25
LEAD = 0.5  # seconds of work kept ready on a queue (the workers prefetch more)
LEAD_WINDOW = 3.0  # seconds of releases the rate is measured over
OBSERVE_EVERY = 5.0  # seconds between exact counts of the held rows (the gauge)
_log = structlog.get_logger("aura.gateway.dispatch")
_Key = tuple[str, uuid.UUID]


class Dispatcher:
    """Releases held outbox rows fairly (see the module's docstring). ``feeds`` maps a
    queue to the queue its tasks publish to (its room is also bounded by that one's)."""

    def __init__(
        self,
        database: Database,
        sender: Sender,
        *,
        depth: int = DEFAULT_DEPTH,
        interval: float = DEFAULT_INTERVAL,
        weights: Mapping[str, float] | None = None,
        feeds: Mapping[str, str] | None = None,
        lease: float = MIN_LEASE,
        now: Callable[[], datetime] = utcnow,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.database = database
        self.sender = sender
        self.depth = depth
        self.interval = interval
        self.feeds = dict(feeds or {})
        self.lease = max(lease, MIN_LEASE)
        self.now = now
        self.clock = clock
        known = dict(weights or {})
        self._share: dict[str, FairShare[uuid.UUID]] = {}
        self._weight = lambda tenant: known.get(str(tenant), 1.0)
        self._wake: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self._task: asyncio.Task[None] | None = None
        self._warned = 0.0
        self._released: dict[str, collections.deque[tuple[float, int]]] = {}
        self._queues_seen: set[str] = set()
        self._unsettled: list[Claim] = []  # claims to put back on hold
        self._observed: set[str] = set()
        self._counted = -OBSERVE_EVERY
        self.backlog: dict[_Key, int] = {}  # held rows at the last look, for metrics

    async def dispatch_once(self) -> int:
        """One round: claim each tenant's share of every queue's room and publish it;
        returns how many were sent. The queues' depths are looked at first: while the
        queues it last saw held rows for are full, the database is not asked."""
        if is_blocked(self.sender):
            return 0
        while self._unsettled:  # a round the database failed in the middle of: first
            await self._hold_again(self._unsettled[0])
            self._unsettled.pop(0)
        depths = await self._depths(self._queues_seen)
        if self._queues_seen and all(self._room(q, depths) <= 0 for q in self._queues_seen):
            return 0
        cap = max((self.depth_for(q) for q in self._queues_seen), default=self.depth) * 4
        async with self.database.session() as session:
            self.backlog = backlog = await held_backlog(session, cap=cap)
            await self._observe(session, backlog)
        self._queues_seen = {queue for queue, _ in backlog}
        if not backlog:
            return 0
        depths.update(await self._depths(self._queues_seen - set(depths)))
        quotas = self._quotas(backlog, depths)
        if not quotas:
            return 0
        claim = Claim.new(self.lease, self.now())
        async with self.database.session() as session:
            rows = await claim_held(session, claim, quotas)
            await session.commit()
        if not rows:
            return 0
        for queue in {m.queue for m in rows}:
            self._note(queue, sum(1 for m in rows if m.queue == queue))
        try:
            sent = await publish_claimed(
                self.database,
                self.sender,
                rows,
                claim,
                lease=self.lease,
                origin="dispatch",
                now=self.now,
            )
        except Exception:  # the database failed mid-publish: what it sent but could not
            self._unsettled.append(claim)  # delete goes back on hold with the rest, as
            raise  # soon as it answers (published again: the inbox absorbs it)
        if sent < len(rows):
            self._unsettled.append(claim)
            await self._hold_again(claim)
            self._unsettled.remove(claim)
        return sent

    async def _depths(self, queues: set[str]) -> dict[str, int | None]:
        looked = queues | {self.feeds[q] for q in queues if q in self.feeds}
        return {queue: await self.sender_depth(queue) for queue in sorted(looked)}

    def _room(self, queue: str, depths: Mapping[str, int | None]) -> int:
        depth = self.depth_for(queue)
        return min(depth - (depths.get(q) or 0) for q in (queue, self.feeds.get(queue, queue)))

    def _quotas(
        self, backlog: Mapping[_Key, int], depths: Mapping[str, int | None]
    ) -> dict[_Key, int]:
        quotas: dict[_Key, int] = {}
        for queue in sorted({queue for queue, _ in backlog}):
            share = self._share.setdefault(queue, FairShare(self._weight))
            waiting = {tenant: n for (q, tenant), n in backlog.items() if q == queue}
            for tenant, units in share.quotas(waiting, self._room(queue, depths)).items():
                quotas[(queue, tenant)] = units
        return quotas

    async def _observe(self, session: AsyncSession, backlog: Mapping[_Key, int]) -> None:
        """The held backlog as gauges (messages and tenants per queue, never a tenant's
        id); the messages counted exactly at most every OBSERVE_EVERY seconds."""
        queues = {queue for queue, _ in backlog} | self._observed
        for queue in queues:
            AURA_OUTBOX_HELD_TENANTS.labels(queue=queue).set(
                sum(1 for q, _ in backlog if q == queue)
            )
        if self.clock() - self._counted < OBSERVE_EVERY and queues == self._observed:
            return
        self._counted = self.clock()
        exact = await held_backlog(session) if backlog else {}
        for queue in queues:
            AURA_OUTBOX_HELD.labels(queue=queue).set(
                sum(n for (q, _), n in exact.items() if q == queue)
            )
        self._observed = queues

    def depth_for(self, queue: str) -> int:
        """How deep ``queue`` is kept: LEAD seconds of the rate this dispatcher released
        to it lately, at least ``depth`` (see the module's docstring)."""
        released = self._released.get(queue)
        if not released:
            return self.depth
        while released and released[0][0] < self.clock() - LEAD_WINDOW:
            released.popleft()
        rate = sum(n for _, n in released) / LEAD_WINDOW
        return max(self.depth, math.ceil(rate * LEAD))

    def _note(self, queue: str, count: int) -> None:
        self._released.setdefault(queue, collections.deque()).append((self.clock(), count))

    async def sender_depth(self, queue: str) -> int | None:
        """Ready messages on ``queue``; None when the sender cannot tell (ungated)."""
        depth = getattr(self.sender, "depth", None)
        return None if depth is None else await depth(queue)

    async def _hold_again(self, claim: Claim) -> None:
        """What a failed publish left goes back on hold (not to the relay's FIFO)."""
        async with self.database.session() as session:
            await session.execute(
                update(OutboxMessage)
                .where(OutboxMessage.claimed_by == claim.owner)
                .values(claimed_by=HELD.owner, claimed_until=HELD.until),
                execution_options={"synchronize_session": False},
            )
            await session.commit()

    async def run(self, *, until_idle: bool = False) -> None:
        """``dispatch_once`` every ``interval`` (or when woken) until cancelled; failures
        are logged and tried again. With ``until_idle`` (started by ``wake``, where no
        lifespan runs a dispatcher) until nothing is held, or a round fails: the next
        ``wake`` tries again."""
        wake = self._event()
        while True:
            wake.clear()
            try:
                await self.dispatch_once()
            except Exception as exc:
                self._warn(exc)
                if until_idle:
                    return
            if until_idle and not self.backlog:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.interval)

    def start(self) -> None:
        """Run on this event loop until ``aclose`` (a gateway's lifespan)."""
        self._task = asyncio.get_running_loop().create_task(self.run())

    def wake(self) -> None:
        """Dispatch now (a request just held an import): wakes the loop, or starts one
        that runs until nothing is held (a gateway built without its lifespan: tests)."""
        self._event().set()
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(self.run(until_idle=True))

    def _event(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if self._wake is None or self._wake[0] is not loop:
            self._wake = (loop, asyncio.Event())
        return self._wake[1]

    def _warn(self, exc: Exception) -> None:
        if self.clock() - self._warned >= 10.0:  # a broker or database outage: once in 10 s
            self._warned = self.clock()
            _log.warning(
                "dispatching held messages failed; trying again", error=describe_exception(exc)
            )

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
