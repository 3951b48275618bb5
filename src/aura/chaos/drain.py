"""Steps 5 and 6 of a chaos run (``aura.chaos.run``): the fault window, opened once the
worker consumes, then the drain, until every fate is written and the broker holds
nothing either, twice; bounded by progress (``stall_s`` with nothing moving fails the
run) and by a last ceiling.

The fault window goes into the run's timeline (``run.recorder``): from the moment
``fault`` starts to the moment ``heal`` returns, labelled with the scenario's name and
summary (a scenario marks finer windows inside it itself)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from aura.contract import ENRICH_TASK
from aura.db import Database
from aura.demo.report import Tally
from aura.messaging import DeadLetter

if TYPE_CHECKING:
    from aura.chaos.run import ChaosRun

__all__ = ["Drain"]

_LOOK_S = 0.5
_LETTERS_EVERY_S = 3.0  # between reads of the DLQ while records are pending
_CEILING_S = 3600.0  # a last bound: progress, not this, ends a healthy run


class Drain:
    """One run's drain: what it has seen so far, and the look that moves it on."""

    def __init__(self, run: ChaosRun, database: Database) -> None:
        self.scenario = run
        self.database = database
        self.begun = self.last_move = time.monotonic()  # the stall bound counts from last_move
        self.signature: tuple[int, ...] | None = None
        self.fault: asyncio.Task[None] | None = None
        self.healed = False
        self.opened_s = 0.0  # the fault window's start, on the run's timeline
        self.letters: list[DeadLetter] = []
        self.letters_read = float("-inf")
        self.empty_reads, self.last_queued = 0, -1

    async def run(self) -> None:
        """Wait for the worker to consume, run the fault window, heal, and drain; a drain
        that could not end is said in the run's ``details["drain"]``."""
        run = self.scenario
        assert run.supervisor is not None
        ceiling = time.monotonic() + _CEILING_S
        try:
            while True:
                await asyncio.sleep(_LOOK_S)
                now = time.monotonic()
                counts = await self._look(now)
                if counts is not None and await self._drained(counts, now):
                    run.letters_seen = self.letters
                    return
                if any(supervisor.gave_up for supervisor in run.supervisors):
                    run.details["drain"] = "the worker kept exiting: the supervisor gave up"
                    return
                if now - self.last_move > run.stall_s or now > ceiling:
                    run.details["drain"] = f"stalled: nothing moved for {run.stall_s:.0f} s"
                    return
        finally:
            await self._end_fault()

    async def _end_fault(self) -> None:
        """A fault window still open is cancelled; one that was not healed is."""
        fault = self.fault
        if fault is not None and not fault.done():
            fault.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fault
        if fault is not None and not self.healed:
            await self.scenario.heal()
            self._close_window()

    def _close_window(self) -> None:
        run = self.scenario
        label = f"{run.name}: {run.summary}"
        run.recorder.add_window(label, self.opened_s, run.recorder.elapsed(), "fault")

    async def _look(self, now: float) -> Tally | None:
        """The counts, and the letters every few seconds (at every look once nothing is
        pending); None when a fault this run injected (a killed connection) hid them."""
        try:
            counts = await self.scenario.tally_now(self.database)
            if counts.pending == 0 or now - self.letters_read >= _LETTERS_EVERY_S:
                self.letters = await asyncio.to_thread(self.scenario.read_letters)
                self.letters_read = now
        except Exception:
            return None
        return counts

    async def _drained(self, counts: Tally, now: float) -> bool:
        """One look's steps: note progress, open the fault window once the worker
        consumes, heal after it; True once every fate is written and the broker holds
        nothing either, twice."""
        run, letters = self.scenario, self.letters
        moved = (
            counts.done, counts.dead_lettered, counts.enriched, len(letters),
            run.simulator.requests, run.worker_restarts,
        )  # fmt: skip
        if moved != self.signature:
            self.signature, self.last_move = moved, now
        if self.fault is None and counts.done + counts.dead_lettered + len(letters) > 0:
            # The worker consumes: only now does the fault window open.
            run.details["fault_started_after_s"] = round(now - self.begun, 2)
            self.opened_s = run.recorder.elapsed()
            self.fault = asyncio.create_task(run.fault())
        imports = len(run.import_ids)
        await run.on_tick(counts)
        if self.fault is not None and self.fault.done() and not self.healed:
            self.fault.result()  # a fault that could not be injected fails the run
            await run.heal()
            self.healed = True
            self._close_window()
        enrich_dead = sum(1 for x in letters if x.task == ENRICH_TASK)
        if not (self.healed and run.settled(counts, enrich_dead, imports, letters)):
            return False
        # Every fate is written; a retry of a committed message (its COMMIT's reply lost,
        # say) may still wait in a queue: the drain ends when the broker holds nothing
        # either, twice.
        queued = await asyncio.to_thread(run.queued_at_broker)
        self.empty_reads = self.empty_reads + 1 if queued == 0 else 0
        if self.empty_reads >= 2:
            return True
        if queued != self.last_queued:
            self.last_queued, self.last_move = queued, now
        return False
