"""``OutageGate``: one worker process holds its deliveries while the database is out.

A database that cannot take a connection (refused, "too many clients", starting up) is an
outage, not a fault of the message: running deliveries into it would spend their retry
budget and, for an enrichment, an LLM call each. The gate is the process's memory of that
outage, shaped like the LLM's circuit breaker:

    state    what a delivery does at ``admit``                     moved by
    open     goes on at once                                        a trial that worked
    closed   waits (its slot held, its message unacked) until the   an outage seen by any
             gate opens or it is picked as the next trial, or its    delivery (``failed``)
             ``bound`` passes (then the caller defers it through
             the broker: a deferral, never a retry)

One trial at a time: the first waiter past ``trial_at`` goes (its own inbox read or
statement is the probe: no extra connection, no LLM call before it). A trial that works
opens the gate and wakes every waiter; one that fails closes it again with the next pause
doubled (``first_pause`` .. ``max_pause``, half jittered), so the process resumes within
``max_pause`` of the database answering and never sends more than one attempt per pause
into an outage. A trial that settles some other way (a poison pill, a dead letter) hands
its turn back (``released``); one that never reports at all (its process hung) is assumed
lost after ``trial_lease`` seconds.

All of it runs on the process's one event loop (no locks); ``clock`` is monotonic seconds
and tests drive a fake one. The state transitions are methods without awaits, tested
without a loop.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import structlog

from aura import events
from aura.backoff import Backoff
from aura.events import Dependency, DependencyGateChanged

__all__ = ["OutageGate"]

_log = structlog.get_logger("aura.messaging.gate")


class OutageGate:
    """Per process and dependency; see the module doc."""

    def __init__(
        self,
        dependency: Dependency,
        *,
        first_pause: float = 0.1,
        max_pause: float = 1.0,
        trial_lease: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.dependency = dependency
        self.pauses = Backoff(base=first_pause, cap=max_pause)
        self.trial_lease = trial_lease
        self.clock = clock
        self.rng = rng or random.Random()
        self.closed_since: float | None = None
        self.failures = 0  # trials failed in a row (0 while open)
        self.trial_at = 0.0  # when the next trial may go
        self.trial_out_since: float | None = None  # a trial is running since then
        self.held = 0  # deliveries waiting at the gate now
        self._changed: asyncio.Future[None] | None = None

    @property
    def is_open(self) -> bool:
        return self.closed_since is None

    # -- transitions (no awaits) ---------------------------------------------------------
    def failed(self, error: str = "") -> None:
        """An outage was seen (by a trial or any delivery): closed, next trial later."""
        now = self.clock()
        if self.closed_since is None:
            self.closed_since = now
            _log.warning(
                "the database is unavailable; holding deliveries until it answers",
                dependency=self.dependency.value,
                error=error,
            )
            events.emit(DependencyGateChanged(self.dependency, available=False))
        self.failures += 1
        self.trial_at = now + self.pauses.delay(self.failures, self.rng)
        self.trial_out_since = None
        self._wake()

    def succeeded(self) -> None:
        """The dependency answered: open, every waiter goes."""
        if self.closed_since is not None:
            _log.warning(
                "the database answers again; releasing held deliveries",
                dependency=self.dependency.value,
                down_s=round(self.clock() - self.closed_since, 3),
                held=self.held,
            )
            events.emit(DependencyGateChanged(self.dependency, available=True))
        self.closed_since = None
        self.failures = 0
        self.trial_out_since = None
        self._wake()

    def released(self, since: float | None) -> None:
        """The trial that went at ``since`` (``trial_out_since`` when it was let in)
        settled without telling (poison, say): the next waiter may try. A later trial's
        turn is not its to give back (a long delivery released another's, seen in review:
        two trials at once)."""
        if since is not None and self.trial_out_since == since:
            self.trial_out_since = None
            self._wake()

    def try_enter(self) -> bool | None:
        """True: go on (open); False: go on as the trial; None: wait."""
        if self.closed_since is None:
            return True
        now = self.clock()
        if self.trial_out_since is not None and now - self.trial_out_since >= self.trial_lease:
            self.trial_out_since = None  # that trial never reported: its turn is over
        if self.trial_out_since is None and now >= self.trial_at:
            self.trial_out_since = now
            return False
        return None

    def wait_hint(self) -> float:
        """Seconds until something may change without a transition (a trial's turn)."""
        now = self.clock()
        if self.trial_out_since is not None:
            return max(self.trial_out_since + self.trial_lease - now, 0.0)
        return max(self.trial_at - now, 0.0)

    # -- waiting (on the loop) -----------------------------------------------------------
    async def admit(self, bound: float) -> bool | None:
        """Wait at the gate at most ``bound`` seconds: True (open), False (this delivery is
        the trial: report ``succeeded``/``failed``/``released``), None (the bound passed)."""
        deadline = self.clock() + bound
        self.held += 1
        try:
            while (entered := self.try_enter()) is None:
                left = deadline - self.clock()
                if left <= 0:
                    return None
                changed = self._future()
                await asyncio.wait({changed}, timeout=min(left, self.wait_hint() or left))
            return entered
        finally:
            self.held -= 1

    def _future(self) -> asyncio.Future[None]:
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        return self._changed

    def _wake(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        self._changed = None
