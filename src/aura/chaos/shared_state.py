"""The scenarios on what the fleet shares through Redis: its memory and its clock.

    scenario     fault
    redis-oom    the run's own redis-server refuses every write for 20 s (``maxmemory 1``
                 under ``noeviction``, a ballast key past it: ``OOM command not allowed``)
                 while 30 % of LLM calls fail, half the records posted in the window;
                 then ``maxmemory 0`` again
    clock-skew   two workers on the run's Redis, one's wall clock 600 s ahead; the LLM
                 down for 8 s (the breaker opens fleet-wide), most records posted in the
                 outage, then the LLM back

What each proves, beyond the accounting's invariants. redis-oom: a refusing Redis is an
optimisation lost, not a fate changed (``aura.redis_errors``): every message committed
once, no dead letter at all, and in particular none the broker dead-lettered (a letter
without an Aura reason: its delivery limit, or Celery rejecting a task whose error
escaped). The window is proved from Redis's own side: a probe write refused with OOM
through the window, the worker's refused writes counted in Redis's ``errorstat_OOM``.
clock-skew: shared time is Redis's ``TIME`` (DESIGN.md invariant 11): every product is
enriched within 10 s of the LLM's recovery, and the breaker's trial calls reach the LLM at
least the reset timeout apart (a worker reading the shared "open until" on its own clock
600 s ahead took its trials every second).

Failure accepted: the trial spacing is measured from the run's side -- the simulator counts
its requests by outcome, and a thread samples the count of outage answers every 10 ms --
so a time is known to a sample, and the spacing is checked with that much slack.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError

from aura.chaos.accounting import Accounting
from aura.chaos.expectations import all_committed
from aura.chaos.run import ChaosRun
from aura.db import Database
from aura.demo.harness import metric_total
from aura.demo.report import Tally
from aura.llm import Faults, LLMSimulator
from aura.messaging import DeadLetter
from aura.redis_connect import async_redis

__all__ = [
    "ClockSkew",
    "RedisOutOfMemory",
    "broker_dead_lettered",
    "skewed_clock_environment",
    "trial_gaps",
]

_BROKER_LETTER = "dead-lettered by the broker"  # aura.messaging.dlq's error for those
_BALLAST_KEY = "aura:chaos:ballast"
_PROBE_KEY = "aura:chaos:probe"
_SAMPLE_S = 0.01


def broker_dead_lettered(letters: list[DeadLetter]) -> int:
    """Letters the broker wrote (no Aura reason: the DLQ reader names them so)."""
    return sum(1 for letter in letters if letter.error.startswith(_BROKER_LETTER))


async def _oom_errors(redis: Redis) -> int:
    """Writes this server refused with OOM since it started (``INFO errorstats``)."""
    stats = await redis.info("errorstats")
    entry = stats.get("errorstat_OOM") or {}
    return int(entry.get("count", 0)) if isinstance(entry, dict) else 0


class RedisOutOfMemory(ChaosRun):
    name = "redis-oom"
    summary = "the run's own Redis refuses writes (OOM) for 20 s while 30 % of LLM calls fail"
    expected_fates = (
        "all committed once; no letter (none broker-dead-lettered); writes refused with "
        "OOM through the window"
    )
    faults = Faults(latency=0.02, error_rate=0.3, error_statuses=(503,), retry_after=0.5)
    environment: ClassVar[dict[str, str]] = {"RETRY_TRACKER_MAX_RETRIES": "8"}
    default_products = 100  # a run of about 45 s (200: 67 s, the breaker opening often)
    window_s = 20.0
    probe_every_s = 0.5

    def first_records(self) -> list[str]:
        return self.records[: len(self.records) // 2]

    async def fault(self) -> None:
        redis = async_redis(self.stack.redis_url, socket_timeout=5)
        try:
            refused_before = await _oom_errors(redis)
            await redis.set(_BALLAST_KEY, b"x" * (1 << 20))  # over the limit, whatever it is
            await redis.config_set("maxmemory-policy", "noeviction")
            await redis.config_set("maxmemory", 1)
            started = time.monotonic()
            self.details["redis_oom_s"] = self.window_s
            # The rest of the records, so their ingests, enrichments and retries all
            # meet the refusing Redis.
            await self.post_import(self.records[len(self.first_records()) :])
            probes = refusals = 0
            while time.monotonic() - started < self.window_s:
                probes += 1
                try:
                    await redis.set(_PROBE_KEY, b"1")
                except OutOfMemoryError as exc:
                    refusals += 1
                    self.details.setdefault("oom_error", str(exc)[:120])
                await asyncio.sleep(self.probe_every_s)
            refused = await _oom_errors(redis) - refused_before
            self.details["probe_writes"], self.details["probe_writes_refused"] = probes, refusals
            self.details["worker_writes_refused"] = refused - refusals
        finally:
            await self._restore(redis)
            await redis.aclose()

    async def heal(self) -> None:
        if self.stack.redis.answers():  # a fault cut short (cancelled) restores here too
            redis = async_redis(self.stack.redis_url, socket_timeout=5)
            try:
                await self._restore(redis)
            finally:
                await redis.aclose()

    async def _restore(self, redis: Redis) -> None:
        await redis.config_set("maxmemory", 0)
        await redis.delete(_BALLAST_KEY)
        await redis.set(_PROBE_KEY, b"1")  # it takes writes again (raises if not)
        self.details["writes_after_window"] = True

    async def before_count(self, database: Database) -> None:
        letters = await asyncio.to_thread(self.read_letters)
        self.details["broker_dead_lettered"] = broker_dead_lettered(letters)

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        failures = all_committed(accounting, self.records)
        if self.details.get("broker_dead_lettered"):
            failures.append(f"{self.details['broker_dead_lettered']} broker-dead-lettered")
        probes = self.details.get("probe_writes", 0)
        if not probes or self.details.get("probe_writes_refused") != probes:
            failures.append(
                f"{self.details.get('probe_writes_refused')} of {probes} probe writes "
                "refused with OOM in the window (all expected)"
            )
        if not self.details.get("worker_writes_refused"):
            failures.append("the worker wrote nothing that Redis refused: the window missed it")
        if not self.details.get("writes_after_window"):
            failures.append("Redis did not take writes again after the window")
        if metrics["retries"] == 0:
            failures.append("no retries: the LLM's failures did not happen")
        return failures


# -- clock-skew ---------------------------------------------------------------------------

_SKEW_VARIABLE = "AURA_CHAOS_CLOCK_SKEW_S"
# Imported by the skewed worker's interpreter at its start, before any other module: every
# later ``from time import time`` or ``from datetime import datetime`` gets the skewed one.
_SITECUSTOMIZE = '''"""Written by aura chaos clock-skew: this interpreter's wall clock is
AURA_CHAOS_CLOCK_SKEW_S seconds ahead: time.time and time.time_ns (so date.today),
clock_gettime(CLOCK_REALTIME), and unless AURA_CHAOS_CLOCK_SKEW_DATETIME=0 the datetime
class's now, utcnow and today. Monotonic clocks are left alone."""

import datetime as _datetime
import os as _os
import time as _time

_SKEW = float(_os.environ["AURA_CHAOS_CLOCK_SKEW_S"])
_SKEW_NS = int(_SKEW * 1_000_000_000)
_time_real, _time_ns_real = _time.time, _time.time_ns
_gettime_real, _gettime_ns_real = _time.clock_gettime, _time.clock_gettime_ns
_Datetime = _datetime.datetime


def _skewed_time():
    return _time_real() + _SKEW


def _skewed_time_ns():
    return _time_ns_real() + _SKEW_NS


def _skewed_clock_gettime(clock):
    return _gettime_real(clock) + (_SKEW if clock == _time.CLOCK_REALTIME else 0.0)


def _skewed_clock_gettime_ns(clock):
    return _gettime_ns_real(clock) + (_SKEW_NS if clock == _time.CLOCK_REALTIME else 0)


class _Kind(type):
    # Datetimes made in C (a driver's, a parser's) are real ones: still "a datetime".
    def __instancecheck__(cls, instance):
        return isinstance(instance, _Datetime)

    def __subclasscheck__(cls, subclass):
        return issubclass(subclass, _Datetime)


class datetime(_Datetime, metaclass=_Kind):
    __slots__ = ()  # the size of the real one: C extensions check it at import

    @classmethod
    def now(cls, tz=None):
        return _Datetime.fromtimestamp(_skewed_time(), tz)

    @classmethod
    def utcnow(cls):
        return _Datetime.utcfromtimestamp(_skewed_time())

    @classmethod
    def today(cls):
        return _Datetime.fromtimestamp(_skewed_time())


datetime.__module__ = "datetime"
_time.time, _time.time_ns = _skewed_time, _skewed_time_ns
_time.clock_gettime, _time.clock_gettime_ns = _skewed_clock_gettime, _skewed_clock_gettime_ns
if _os.environ.get("AURA_CHAOS_CLOCK_SKEW_DATETIME", "1") == "1":
    _datetime.datetime = datetime
'''


def skewed_clock_environment(
    directory: Path, skew_s: float, pythonpath: str = "", *, datetimes: bool = True
) -> dict[str, str]:
    """The environment that starts a Python process with its wall clock ``skew_s`` ahead:
    a ``sitecustomize`` in ``directory``, first on its ``PYTHONPATH``. Without
    ``datetimes``, ``datetime.now`` stays on time (``time.time`` alone is skewed)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    path = os.pathsep.join(part for part in (str(directory), pythonpath) if part)
    return {
        "PYTHONPATH": path,
        _SKEW_VARIABLE: repr(float(skew_s)),
        "AURA_CHAOS_CLOCK_SKEW_DATETIME": "1" if datetimes else "0",
    }


class _OutcomeTimes:
    """A thread that samples the simulator's count of one outcome every 10 ms and keeps
    the run's monotonic time of each request counted (a sample's time for all it saw)."""

    def __init__(self, simulator: LLMSimulator, outcome: str) -> None:
        self._simulator = simulator
        self._key = f"outcome:{outcome}"
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="chaos-outcomes", daemon=True)

    def _sample(self) -> None:
        seen = self._simulator.stats[self._key]
        while not self._stop.wait(_SAMPLE_S):
            count = self._simulator.stats[self._key]
            self.times += [time.monotonic()] * (count - seen)
            seen = count

    def __enter__(self) -> _OutcomeTimes:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def trial_gaps(calls: list[float], reset_timeout: float, fail_max: int) -> list[float]:
    """Seconds between the breaker's trial calls, from the times the provider was called
    in an outage. The breaker opened at the ``fail_max``-th failed call or later, and no
    trial comes before it has been open ``reset_timeout``: the calls before that are the
    opening ones (those in flight, and a process's until its next read of the record)."""
    if len(calls) < fail_max:
        return []
    trials = [t for t in calls if t >= calls[fail_max - 1] + reset_timeout]
    return [round(b - a, 3) for a, b in itertools.pairwise(trials)]


class ClockSkew(ChaosRun):
    """Two workers on the run's Redis; worker 1's wall clock is 600 s ahead.

    Skewed, in worker 1's interpreter only (a ``sitecustomize`` first on its PYTHONPATH,
    ``skewed_clock_environment``): ``time.time``, ``time.time_ns``, ``clock_gettime`` of
    ``CLOCK_REALTIME``, and ``datetime.datetime.now``/``utcnow``/``today`` (``date.today``
    follows ``time.time``) -- so its logs, the timestamps it writes (its enrichments'
    ``created_at``: the run's ``latency_p50_s``/``p99_s`` are 600 s off for them), Celery's
    ``eta`` for its retries, and the breaker's and the rate limiter's own clocks are 600 s
    ahead. Not skewed: its monotonic clocks (sleeps, timeouts, the event loop, time
    limits), clocks read in C by other libraries (``time.localtime()`` with no argument),
    worker 0, the run itself, Redis, PostgreSQL, RabbitMQ and the LLM simulator. With
    ``skew_datetime`` False, ``datetime`` stays on time: ``time.time`` alone is ahead.

    The LLM is down for ``outage_s`` (8 s: four reset timeouts); a quarter of the records
    go in before it, the rest at its start, so their enrichments meet the open breaker.
    The fleet-wide rate limiter is on (generously: it must not be what defers). Measured on
    the run's monotonic clock: the recovery (the outage's end), and the first look (every
    0.5 s) that finds every product enriched.

    Fails today with ``datetime`` skewed: a deferral is ``task.retry(countdown=...)``, and
    Celery stamps the retry's ``eta`` header with the sender's ``datetime.now``; worker 0
    takes an eta 600 s ahead at its word and holds the delivery (the drain stalls). With
    ``time.time`` alone ahead (the breaker's and the limiter's clocks) it passes."""

    name = "clock-skew"
    summary = "two workers 600 s apart on one Redis; an LLM outage opens the breaker, then ends"
    expected_fates = (
        "all committed once; each worker deferred; all enriched within 10 s of the LLM's "
        "recovery; trial calls at least the reset timeout apart"
    )
    workers = 2
    faults = Faults(latency=0.005)
    environment: ClassVar[dict[str, str]] = {
        "RETRY_TRACKER_MAX_RETRIES": "8",
        "LLM_RATE_LIMIT_RPM": "60000",
    }
    skew_s = 600.0
    skew_datetime = True  # False: time.time alone (the breaker's and limiter's clocks)
    outage_s = 8.0
    recovery_bound_s = 10.0
    # Nothing here waits longer than a deferral (3 s) or a retry (4 s): a stall of 30 s
    # is work held back (a wall-clock time taken as shared), not slowness.
    stall_s = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._recovered_at: float | None = None
        self._all_enriched_at: float | None = None
        self._enriched_seen = 0

    def worker_environment(self, index: int) -> dict[str, str]:
        if index == 0:
            return {}
        return skewed_clock_environment(
            self.scratch / f"skewed-clock-{index}",
            self.skew_s,
            os.environ.get("PYTHONPATH", ""),
            datetimes=self.skew_datetime,
        )

    def first_records(self) -> list[str]:
        return self.records[: max(1, len(self.records) // 4)]

    async def fault(self) -> None:
        with _OutcomeTimes(self.simulator, "outage") as outage_calls:
            self.simulator.start_outage(self.outage_s)
            self._recovered_at = time.monotonic() + self.outage_s
            await self.post_import(self.records[len(self.first_records()) :])
            await asyncio.sleep(max(0.0, self._recovered_at - time.monotonic()) + 0.1)
        reset = self.settings.circuit_breaker_reset_timeout
        self.details["skew_s"] = self.skew_s
        self.details["llm_outage_s"] = self.outage_s
        self.details["llm_calls_during_outage"] = len(outage_calls.times)
        self.details["trial_gaps_s"] = trial_gaps(
            outage_calls.times, reset, self.settings.circuit_breaker_fail_max
        )

    async def on_tick(self, counts: Tally) -> None:
        self._enriched_seen = counts.enriched
        if self._all_enriched_at is None and counts.enriched >= len(self.records):
            self._all_enriched_at = time.monotonic()

    def _deferrals_of(self, index: int) -> int:
        registry = CollectorRegistry()
        for directory in self.metric_dirs:
            if directory.name.startswith(f"worker-{index}-"):
                MultiProcessCollector(registry, path=str(directory))
        return metric_total(registry, "aura_task_retries_total", kind="deferral")

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        failures = all_committed(accounting, self.records)
        reset = self.settings.circuit_breaker_reset_timeout
        if metrics["breaker_opens"] < 1:
            failures.append("the breaker never opened")
        deferrals = [self._deferrals_of(index) for index in range(self.workers)]
        self.details["deferrals_by_worker"] = deferrals
        if not all(deferrals):
            failures.append(f"deferrals by worker {deferrals}: each should meet the open breaker")
        if self._recovered_at is None or self._all_enriched_at is None:
            failures.append(
                f"{self._enriched_seen} of {len(self.records)} products enriched while the "
                "run watched"
            )
        else:
            after = round(self._all_enriched_at - self._recovered_at, 2)
            self.details["all_enriched_after_recovery_s"] = after
            if after > self.recovery_bound_s:
                failures.append(
                    f"the last product was enriched {after} s after the LLM recovered "
                    f"(bound {self.recovery_bound_s:.0f} s)"
                )
        gaps = self.details.get("trial_gaps_s", [])
        if not gaps:
            failures.append("fewer than two trial calls in the outage: spacing not measured")
        elif min(gaps) < reset - 2 * _SAMPLE_S:
            failures.append(f"trial calls {min(gaps)} s apart, under the reset timeout ({reset} s)")
        return failures
