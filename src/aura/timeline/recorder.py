"""What a run keeps for its timeline: its start, its fault windows, its sampler.

Every ``ImportRun`` (the demo, each chaos scenario) has one, ``run.recorder``. Windows
and marks cost nothing and are always kept; sampling runs only when the run is asked for
a report (``enabled``). A scenario marks its own moments::

    with self.recorder.window("Redis down"):      # a window: its start to its end
        ...
    self.recorder.mark("worker process killed")   # an instant

Times are seconds since the run's start (``begin``), on an injected monotonic clock;
the wall clock at that start maps the database's timestamps onto the same axis.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from aura.timeline.records import record_groups
from aura.timeline.sampler import Sampler, Source
from aura.timeline.series import Group, Timeline, Window

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["Recorder", "sampled_groups"]

_MAX_WINDOWS = 500  # a scenario marking in a loop is bounded too


def sampled_groups() -> dict[str, Group]:
    """The charts the sampler feeds, in the page's order after the records' two."""
    return {
        "fates": Group("fates", "Fates (cumulative)", "messages"),
        "breaker": Group(
            "breaker", "LLM breaker: state (0 closed, 1 half-open, 2 open), opens", "", step=True
        ),
        "queues": Group("queues", "Queue depths (the run's vhost)", "messages", step=True),
    }


class Recorder:
    """One run's clock, windows and (when ``enabled``) sampler."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.wall = wall
        self.enabled = False
        self.started = clock()
        self.started_wall = wall()
        self.duration_s: float | None = None
        self.windows: list[Window] = []
        self.groups = sampled_groups()
        self.derived: list[Group] = []  # read after the run (``aura.timeline.records``)
        self.sampler: Sampler | None = None
        self.notes: list[str] = []
        self._lock = threading.Lock()  # marks may come from a supervisor's thread

    def begin(self, sources: Callable[[], list[Source]]) -> None:
        """The run starts now; with ``enabled``, its sampler too (``sources()`` is
        called only then; a source that cannot be made is a note, not a failure)."""
        self.started, self.started_wall = self.clock(), self.wall()
        if not self.enabled:
            return
        try:
            made = sources()
        except Exception as exc:
            self.notes.append(f"nothing sampled: {exc}")
            return
        self.sampler = Sampler(made, self.groups, started=self.started, clock=self.clock)
        self.sampler.start()

    def finish(self) -> None:
        """The run's sampling ends; its duration is fixed."""
        if self.duration_s is None:
            self.duration_s = self.elapsed()
        if self.sampler is not None:
            self.sampler.stop()
            self.notes.extend(self.sampler.notes)
            self.sampler = None

    async def read_records(
        self, session: AsyncSession, tenant_id: uuid.UUID | None, import_ids: Sequence[uuid.UUID]
    ) -> None:
        """The sampling ends; with ``enabled``, the records' charts are read from the
        database (a failed read is a note: the report goes without them)."""
        self.finish()
        if not (self.enabled and tenant_id is not None and import_ids):
            return
        try:
            self.derived = await record_groups(
                session,
                tenant_id,
                import_ids,
                started_wall=self.started_wall,
                duration_s=self.duration_s or 0.0,
            )
        except Exception as exc:
            self.notes.append(f"records/s and latency not read: {exc}")

    def elapsed(self) -> float:
        return self.clock() - self.started

    def add_window(self, label: str, start_s: float, end_s: float, kind: str = "mark") -> None:
        with self._lock:
            if len(self.windows) < _MAX_WINDOWS:
                self.windows.append(Window(label, round(start_s, 3), round(end_s, 3), kind))

    def mark(self, label: str) -> None:
        """An instant: a window that starts and ends now."""
        now = self.elapsed()
        self.add_window(label, now, now)

    @contextlib.contextmanager
    def window(self, label: str, kind: str = "mark") -> Iterator[None]:
        """A window from the block's start to its end (an exception ends it too)."""
        start = self.elapsed()
        try:
            yield
        finally:
            self.add_window(label, start, self.elapsed(), kind)

    def timeline(
        self,
        name: str,
        *,
        summary: str = "",
        seed: int | None = None,
        passed: bool = True,
        table: list[tuple[str, str]] | None = None,
        failures: list[str] | None = None,
    ) -> Timeline:
        """The run's report as data: the records' charts, then the sampled ones that
        got any series."""
        self.finish()
        sampled = [group for group in self.groups.values() if group.series]
        return Timeline(
            name=name,
            summary=summary,
            seed=seed,
            passed=passed,
            duration_s=self.duration_s or 0.0,
            groups=[*self.derived, *sampled],
            windows=sorted(self.windows, key=lambda w: (w.start_s, w.end_s)),
            table=table or [],
            failures=failures or [],
            notes=self.notes,
        )
