"""The run's own sampler: each source read on its own cadence, in its own thread, into the
timeline's groups.

    source    every   reads                                           costs
    metrics   1 s     the workers' Prometheus files (multiprocess     a few ms: files
                      directories) or this process's registry         read, no network
    queues    1 s     the run's queues' ready messages (passive       a few ms: one
                      declares, ``aura.timeline.queue_probe``)           round trip a queue

A source gets a thread of its own so a slow one (a connect that waits for a dead node)
never delays another. Sampling never fails the run: a source that raises leaves a gap
(None at that time in every series it fed) and is read again at its next tick; after
``give_up_after`` failures in a row it stops, with a note in the timeline. Samples are
bounded (``limit`` per source), and a tick that ran late is not caught up in a burst.
The clock and the wait are injected: the tests drive ticks without sleeping.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aura.timeline.series import Group

__all__ = ["Reading", "Sampler", "Source", "metric_source", "queue_source", "read_metrics"]

log = logging.getLogger(__name__)

# A source's reading: group name -> series name -> value (None: not known at this tick).
Reading = dict[str, dict[str, float | None]]

_LIMIT = 7200  # samples per source: two hours at one a second
_GIVE_UP_AFTER = 30  # failures in a row
_JOIN_S = 2.0  # a source stuck in a call is left to end on its own (its thread is a daemon)


@dataclass(frozen=True)
class Source:
    """A named reading, taken every ``every_s`` seconds."""

    name: str
    read: Callable[[], Reading]
    every_s: float = 1.0
    close: Callable[[], None] | None = None  # what the reads held, given back at the stop


class Sampler:
    """Reads ``sources`` into ``groups`` (only the groups named there are kept), at
    ``clock() - started`` seconds."""

    def __init__(
        self,
        sources: list[Source],
        groups: dict[str, Group],
        *,
        started: float,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[float], bool] | None = None,
        limit: int = _LIMIT,
        give_up_after: int = _GIVE_UP_AFTER,
    ) -> None:
        self.sources = sources
        self.groups = groups
        self.started = started
        self.clock = clock
        self._stop = threading.Event()
        self._wait = wait or self._stop.wait
        self.limit = limit
        self.give_up_after = give_up_after
        self.samples = dict.fromkeys((s.name for s in sources), 0)
        self.failures = dict.fromkeys((s.name for s in sources), 0)
        self.notes: list[str] = []
        self._fed: dict[str, set[str]] = {s.name: set() for s in sources}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def sample(self, source: Source) -> bool:
        """One reading of ``source`` into the groups (a gap if it raised); False once the
        source is done (its limit reached, or it gave up)."""
        name = source.name
        if self.samples[name] >= self.limit or self.failures[name] >= self.give_up_after:
            return False
        at = self.clock() - self.started
        try:
            reading = source.read()
        except Exception as exc:
            self.failures[name] += 1
            reading = {group: {} for group in self._fed[name]}  # a gap in what it fed
            if self.failures[name] >= self.give_up_after:
                self.notes.append(f"{name}: stopped after {self.give_up_after} failed reads")
                log.warning("timeline: the %s source stopped: %s", name, exc)
        else:
            self.failures[name] = 0
        with self._lock:
            for group_name, values in reading.items():
                group = self.groups.get(group_name)
                if group is not None:
                    group.add(round(at, 3), values)
                    self._fed[name].add(group_name)
        self.samples[name] += 1
        return True

    def run_source(self, source: Source) -> None:
        """``source``'s loop: a sample, then a wait to its next tick, until stopped."""
        due = self.clock()
        while not self._stop.is_set():
            if not self.sample(source):
                return
            due += source.every_s
            late = self.clock() - due
            if late > 0:  # a slow read: the next tick is now, not a burst to catch up
                due += late
            if self._wait(max(0.0, due - self.clock())):
                return

    def start(self) -> None:
        for source in self.sources:
            thread = threading.Thread(
                target=self.run_source, args=(source,), name=f"timeline-{source.name}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        """Stop every source (a read in flight is given ``_JOIN_S`` to end)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=_JOIN_S)
        for source in self.sources:
            if source.close is not None:
                try:
                    source.close()
                except Exception as exc:  # a source's clean-up never fails the run
                    log.warning("timeline: closing the %s source failed: %s", source.name, exc)
            if self.samples[source.name] >= self.limit:
                self.notes.append(f"{source.name}: stopped at its limit of {self.limit} samples")


# -- the sources ---------------------------------------------------------------------------
# The names are metrics.py's (a contract): fates, the breaker, dead letters by reason.
_OUTCOMES = "aura_task_outcomes_total"
_RETRIES = "aura_task_retries_total"
_DLQ = "messages_sent_to_dlq_total"
_BREAKER_STATE = "llm_circuit_breaker_state"
_BREAKER_OPENS = "llm_circuit_breaker_opens_total"


def read_metrics(registry: Any) -> Reading:
    """The fates (cumulative: committed, retried, deferred, dead-lettered by reason) and
    the LLM breaker (its state, the highest of any breaker: 0 closed, 1 half-open,
    2 open; its opens) from ``registry``'s samples, in one pass."""
    fates: dict[str, float | None] = {"committed": 0.0, "retried": 0.0, "deferred": 0.0}
    state: float | None = None
    opens = 0.0
    for family in registry.collect():
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, float(sample.value)
            if name == _OUTCOMES and labels.get("outcome") == "success":
                fates["committed"] = (fates["committed"] or 0.0) + value
            elif name == _RETRIES and labels.get("kind") in ("retry", "deferral"):
                key = "retried" if labels["kind"] == "retry" else "deferred"
                fates[key] = (fates[key] or 0.0) + value
            elif name == _DLQ and value > 0:
                key = f"dead-lettered: {labels.get('reason', '?')}"
                fates[key] = (fates.get(key) or 0.0) + value
            elif name == _BREAKER_STATE:
                state = value if state is None else max(state, value)
            elif name == _BREAKER_OPENS:
                opens += value
    return {"fates": fates, "breaker": {"state": state or 0.0, "opens": opens}}


def metric_source(registry: Callable[[], Any], every_s: float = 1.0) -> Source:
    """The fates and the breaker, read from the registry ``registry()`` makes (a new
    one each time over the workers' multiprocess directories, or this process's)."""
    return Source("metrics", lambda: read_metrics(registry()), every_s)


_DELAYED = re.compile(r"^celery_delayed_\d+$")
_CONTROL = re.compile(r"pidbox|^celeryev|reply\.celery")  # Celery's own, never work


def queue_source(
    depths: Callable[[], dict[str, int]],
    every_s: float = 1.0,
    close: Callable[[], None] | None = None,
) -> Source:
    """The queues' depths from ``depths()`` (``aura.timeline.queue_probe.QueueProbe`` over
    AMQP, or rabbitmqctl's ``queue_depths`` every 5 s): the delayed-delivery levels
    summed as one, Celery's control queues left out."""

    def read() -> Reading:
        folded: dict[str, float | None] = {}
        for name, count in depths().items():
            if _CONTROL.search(name):
                continue
            key = "delayed (all levels)" if _DELAYED.match(name) else name
            folded[key] = (folded.get(key) or 0.0) + count
        return {"queues": dict(sorted(folded.items()))}

    return Source("queues", read, every_s, close)
