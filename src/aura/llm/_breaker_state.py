"""The breaker's state machine: one shared record and one pure function over it.

States (the seed's policy: open after ``fail_max`` failures in a row, half-open after
``reset_timeout`` seconds)::

    closed ──fail_max failures──► open ──reset_timeout──► half-open (one trial, fleet-wide)
      ▲                                                    │ trial fails: open again
      └──────────────────── trial succeeds ────────────────┘

``transition(record, event, now)`` is the whole machine: no clock of its own, no I/O, so
it is tested by exact records in and out, and applied the same way locally and inside a
Redis transaction (``aura.llm._breaker_store``).

The opening rule, as it holds across a fleet. The breaker opens when ``fail_max``
failures are recorded fleet-wide, the first and the last at most ``failure_window``
seconds apart, with no success recorded between them. Every failure is recorded (it goes
to Redis). A success is recorded only by a process that knows of the failures: a success
made while this process's cached view shows failures resets the count at once; one made
while its view shows none costs nothing (no Redis round trip: that is the closed hot
path) and is recorded with the process's next refresh, i.e. its first call at least
``refresh_interval`` (1 s) later, if by then the count holds failures older than the
success. So "``fail_max`` consecutive failures" is exact for successes at least one
refresh interval older than the failure that would open the breaker, and for a single
process; a success newer than that, in another process, may not break the run (fail B,
succeed A, fail B, fail B within a second opens it). Making it exact would cost every
successful call a Redis round trip.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aura.events import CircuitState

__all__ = ["BreakerRecord", "Decision", "transition", "transition_all"]

# Module constants: an Enum member looked up on its class costs ~0.2 us on Python 3.11,
# most of the closed path's budget (bench/llm_breaker.py)
_CLOSED, _OPEN, _HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


@dataclass(frozen=True, slots=True)
class BreakerRecord:
    """The shared state of one breaker."""

    state: CircuitState = _CLOSED
    failures: int = 0  # failures in the current run while closed
    open_until: float = 0.0  # when a trial call may run
    trial_until: float = 0.0  # lease of the running trial call (half-open)
    first_failure: float = 0.0  # when the current run of failures began
    last_failure: float = 0.0  # when its latest failure was recorded
    # the run's failure times within the window, oldest first (at most fail_max): the
    # window slides over them
    recent: tuple[float, ...] = ()

    def to_redis(self) -> dict[str, str]:
        return {
            "state": self.state.value,
            "failures": str(self.failures),
            "open_until": repr(self.open_until),
            "trial_until": repr(self.trial_until),
            "first_failure": repr(self.first_failure),
            "last_failure": repr(self.last_failure),
            "recent": " ".join(repr(at) for at in self.recent),
        }

    @classmethod
    def from_redis(cls, raw: Mapping[Any, Any]) -> BreakerRecord:
        """The record from HGETALL (bytes or str keys); an empty hash is a closed breaker."""
        if not raw:
            return cls()
        fields = {_text(key): _text(value) for key, value in raw.items()}
        return cls(
            state=CircuitState(fields["state"]),
            failures=int(fields["failures"]),
            open_until=float(fields["open_until"]),
            trial_until=float(fields["trial_until"]),
            first_failure=float(fields.get("first_failure", 0.0)),  # absent before issue 16
            last_failure=float(fields.get("last_failure", 0.0)),
            recent=tuple(float(at) for at in fields.get("recent", "").split()),  # issue 26
        )


def _run_times(record: BreakerRecord) -> tuple[float, ...]:
    """The current run's failure times (a record written before they were kept: its
    first and last, the ones between taken as the first)."""
    if not record.failures:
        return ()
    if record.recent:
        return record.recent
    middle = (record.first_failure,) * max(record.failures - 2, 0)
    return (record.first_failure, *middle, record.last_failure)[: record.failures]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class Decision:
    """What a transition decided, besides the new record."""

    allowed: bool = True  # the call may run (for "acquire")
    trial: bool = False  # ... as the one half-open trial
    opened: bool = False  # this transition moved the breaker to open


_ALLOW = Decision()


def transition(
    record: BreakerRecord,
    event: str,
    now: float,
    *,
    fail_max: int,
    reset_timeout: float,
    trial_lease: float,
    failure_window: float = float("inf"),
) -> tuple[BreakerRecord, Decision]:
    """The whole state machine, as a pure function of (record, event, now).

    Events: ``acquire`` (may a call run now?), ``failure`` and ``success`` (of a normal
    call; for a success, ``now`` is when it happened, which may be before failures other
    processes recorded since: those it does not undo), ``trial_failure``,
    ``trial_success`` and ``trial_abandoned`` (of the half-open trial; abandoned when it
    was cancelled before it could tell).
    """
    replace = dataclasses.replace
    if event == "acquire":
        if record.state is _CLOSED:
            return record, _ALLOW
        trial_free = record.state is _OPEN or now >= record.trial_until
        if now >= record.open_until and trial_free:
            leased = replace(record, state=_HALF_OPEN, trial_until=now + trial_lease)
            return leased, Decision(allowed=True, trial=True)
        return record, Decision(allowed=False)
    if event == "failure":
        if record.state is not _CLOSED:
            return record, _ALLOW  # already open: a straggler's failure changes nothing
        # The window slides: the failures of the run within ``failure_window`` of this one
        # count (failures at 0, 50, 100 and 105 s open a 60 s window at 105 s).
        recent = sorted((*_run_times(record), now))
        recent = [at for at in recent if now - at <= failure_window][-fail_max:]
        failures, first = len(recent), recent[0]
        if failures >= fail_max:
            opened = BreakerRecord(
                _OPEN, failures, now + reset_timeout, 0.0, first, now, tuple(recent)
            )
            return opened, Decision(opened=True)
        changed = replace(
            record, failures=failures, first_failure=first, last_failure=now, recent=tuple(recent)
        )
        return changed, _ALLOW
    if event == "success":
        if record.state is _CLOSED and record.failures and now >= record.last_failure:
            cleared = replace(record, failures=0, first_failure=0.0, last_failure=0.0, recent=())
            return cleared, _ALLOW
        return record, _ALLOW
    if event == "trial_failure":
        reopened = replace(record, state=_OPEN, open_until=now + reset_timeout, trial_until=0.0)
        return reopened, Decision(opened=True)
    if event == "trial_success":
        return BreakerRecord(), _ALLOW
    if event == "trial_abandoned":  # the trial was cancelled: let the next caller try
        if record.state is _HALF_OPEN:
            return replace(record, state=_OPEN, trial_until=0.0), _ALLOW
        return record, _ALLOW
    raise ValueError(f"unknown breaker event {event!r}")


def transition_all(
    record: BreakerRecord,
    changes: Sequence[tuple[str, float]],
    *,
    fail_max: int,
    reset_timeout: float,
    trial_lease: float,
    failure_window: float = float("inf"),
) -> tuple[BreakerRecord, Decision]:
    """Events applied in order; the last decision, ``opened`` if any of them opened it."""
    decision, opened = _ALLOW, False
    for event, now in changes:
        record, decision = transition(
            record,
            event,
            now,
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            trial_lease=trial_lease,
            failure_window=failure_window,
        )
        opened = opened or decision.opened
    if opened and not decision.opened:
        decision = dataclasses.replace(decision, opened=True)
    return record, decision
