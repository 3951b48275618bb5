"""The circuit breaker pinned where a user would notice a change (found by
scripts/mutation.py): the seed's defaults and the bounds, the state machine's edges on an
injected clock, Redis down and back, and what the log says when it opens."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions
from structlog.testing import capture_logs

from aura.errors import CircuitOpenError
from aura.events import CircuitState
from aura.llm import BreakerRecord, CircuitBreaker, transition
from aura.llm.breaker import Decision
from tests.helpers import FakeClock
from tests.llm.support import POLICY, boom, counts_boom, fail, ok

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


async def bad_request() -> str:
    raise ValueError("400: the request is wrong")


class Switch:
    """A Redis client whose connections can be refused (Redis down) and allowed again,
    and which counts the connections it hands out (one per round trip)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.down = False
        self.round_trips = 0
        real = client.connection_pool.get_connection

        async def get_connection(*args: Any, **kwargs: Any) -> Any:
            self.round_trips += 1
            if self.down:
                raise redis.exceptions.ConnectionError("Error 111 connecting: refused")
            return await real(*args, **kwargs)

        client.connection_pool.get_connection = get_connection  # type: ignore[method-assign]


@pytest.fixture
def switch(redis: aioredis.Redis) -> Switch:
    return Switch(redis)


def shared_breaker(switch: Switch, clock: FakeClock, name: str | None = None) -> CircuitBreaker:
    return CircuitBreaker(
        name or f"pins-{uuid.uuid4().hex[:8]}",
        redis=switch.client,
        clock=clock,
        is_failure=counts_boom,
    )


# -- defaults and bounds --------------------------------------------------------------------


def test_the_seeds_defaults() -> None:
    breaker = CircuitBreaker()
    assert (breaker.name, breaker.fail_max, breaker.reset_timeout) == ("llm", 3, 60.0)
    assert breaker.failure_window == 60.0
    assert breaker.key == "aura:circuit_breaker:llm"
    assert breaker.state is CLOSED
    assert not breaker.shared


async def test_by_default_any_exception_counts_and_three_open_it() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(clock=clock)
    for _ in range(2):
        with pytest.raises(ValueError, match="400"):
            await breaker.call(bad_request)
    assert breaker.state is CLOSED
    with pytest.raises(ValueError, match="400"):
        await breaker.call(bad_request)
    assert breaker.state is OPEN
    clock.advance(59.999)
    with pytest.raises(CircuitOpenError) as rejected:
        await breaker.call(ok)
    assert rejected.value.retry_after == pytest.approx(0.001, abs=1e-6)
    clock.advance(0.001)  # exactly 60 s: the trial runs
    assert await breaker.call(ok) == "ok"
    assert breaker.state is CLOSED


@pytest.mark.parametrize(
    "bad",
    [
        {"fail_max": 0},
        {"reset_timeout": 0},
        {"reset_timeout": -1},
        {"trial_lease": 0},
        {"failure_window": 0},
    ],
)
def test_bounds_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="fail_max must be >= 1"):
        CircuitBreaker(**bad)  # type: ignore[arg-type]


async def test_the_smallest_allowed_values_work() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(
        fail_max=1, reset_timeout=0.5, trial_lease=0.5, failure_window=0.5, clock=clock
    )
    with pytest.raises(ValueError, match="400"):
        await breaker.call(bad_request)
    assert breaker.state is OPEN  # one failure opens it
    clock.advance(0.5)
    assert await breaker.call(ok) == "ok"


# -- the pure state machine's edges ---------------------------------------------------------


def test_a_success_on_an_open_or_half_open_record_changes_nothing() -> None:
    for record in (BreakerRecord(OPEN, 3, 160.0), BreakerRecord(HALF_OPEN, 3, 160.0, 195.0)):
        after, decision = transition(record, "success", 170.0, **POLICY)
        assert after == record
        assert decision.allowed
        assert not decision.opened
        straggler, _ = transition(record, "failure", 170.0, **POLICY)
        assert straggler == record


def test_a_success_on_a_clean_closed_record_changes_nothing() -> None:
    record = BreakerRecord(CLOSED, 0, last_failure=0.0)
    assert transition(record, "success", 5.0, **POLICY)[0] is record


def test_the_trial_lease_and_abandonment() -> None:
    leased = BreakerRecord(HALF_OPEN, 3, 160.0, 195.0)
    abandoned, decision = transition(leased, "trial_abandoned", 170.0, **POLICY)
    assert abandoned == BreakerRecord(OPEN, 3, 160.0, 0.0)
    assert not decision.opened
    _, next_one = transition(abandoned, "acquire", 170.0, **POLICY)
    assert next_one.trial  # the next caller tries at once
    closed = BreakerRecord(CLOSED, 1)
    assert transition(closed, "trial_abandoned", 170.0, **POLICY)[0] is closed
    _, during = transition(leased, "acquire", 194.9, **POLICY)
    assert not during.allowed
    reopened, failed = transition(leased, "trial_failure", 180.0, **POLICY)
    assert reopened == BreakerRecord(OPEN, 3, 240.0, 0.0)
    assert failed.opened
    assert not failed.trial


def test_records_cross_redis_as_text_and_back() -> None:
    record = BreakerRecord(HALF_OPEN, 4, 1.5, 2.25, 0.125, 0.75, (0.125, 0.5, 0.75))
    raw = record.to_redis()
    assert raw == {
        "state": "half_open",
        "failures": "4",
        "open_until": "1.5",
        "trial_until": "2.25",
        "first_failure": "0.125",
        "last_failure": "0.75",
        "recent": "0.125 0.5 0.75",
    }
    as_bytes = {k.encode(): v.encode() for k, v in raw.items()}
    assert BreakerRecord.from_redis(as_bytes) == record
    old = {b"state": b"open", b"failures": b"3", b"open_until": b"9.0", b"trial_until": b"0.0"}
    assert BreakerRecord.from_redis(old) == BreakerRecord(OPEN, 3, 9.0, 0.0, 0.0, 0.0)
    assert BreakerRecord.from_redis({}) == BreakerRecord()


# -- the breaker: trial edges ---------------------------------------------------------------


async def test_a_4xx_during_the_trial_closes_the_breaker(
    breaker_and_clock: tuple[FakeClock, CircuitBreaker],
) -> None:
    clock, breaker = breaker_and_clock
    await fail(breaker, 3)
    clock.advance(60)
    with pytest.raises(ValueError, match="400"):
        await breaker.call(bad_request)  # the provider answered: it is up
    assert breaker.state is CLOSED
    assert await breaker.call(ok) == "ok"  # not blocked for the trial lease


async def test_retry_after_during_another_callers_trial_is_the_lease_left(
    breaker_and_clock: tuple[FakeClock, CircuitBreaker],
) -> None:
    clock, breaker = breaker_and_clock
    await fail(breaker, 3)
    clock.advance(60)
    started, release = asyncio.Event(), asyncio.Event()

    async def slow() -> str:
        started.set()
        await release.wait()
        return "slow"

    trial = asyncio.create_task(breaker.call(slow))
    await asyncio.wait_for(started.wait(), 10)
    assert breaker.state is HALF_OPEN
    clock.advance(10)
    with pytest.raises(CircuitOpenError) as rejected:
        await breaker.call(ok)
    assert rejected.value.retry_after == pytest.approx(50.0)  # the 60 s lease, 10 s in
    release.set()
    assert await trial == "slow"
    assert breaker.state is CLOSED


async def test_a_cancelled_normal_call_counts_for_nothing(
    breaker_and_clock: tuple[FakeClock, CircuitBreaker],
) -> None:
    _, breaker = breaker_and_clock
    await fail(breaker, 2)

    async def cancelled() -> str:
        raise asyncio.CancelledError

    for _ in range(3):
        with pytest.raises(asyncio.CancelledError):
            await breaker.call(cancelled)
    assert breaker.state is CLOSED
    await fail(breaker, 1)  # the third failure in a row: cancellations broke nothing
    assert breaker.state is OPEN


async def test_a_4xx_between_failures_is_a_success(
    breaker_and_clock: tuple[FakeClock, CircuitBreaker],
) -> None:
    _, breaker = breaker_and_clock
    await fail(breaker, 2)
    with pytest.raises(ValueError, match="400"):
        await breaker.call(bad_request)
    await fail(breaker, 2)
    assert breaker.state is CLOSED
    await fail(breaker, 1)
    assert breaker.state is OPEN


async def test_failures_more_than_the_window_apart_do_not_open_it(
    breaker_and_clock: tuple[FakeClock, CircuitBreaker],
) -> None:
    clock, breaker = breaker_and_clock
    await fail(breaker, 2)
    clock.advance(60.5)  # the default window is 60 s
    await fail(breaker, 2)
    assert breaker.state is CLOSED
    clock.advance(59.5)
    await fail(breaker, 1)
    assert breaker.state is OPEN


async def test_opening_logs_one_warning_that_says_so(
    breaker_and_clock: tuple[FakeClock, CircuitBreaker],
) -> None:
    _, breaker = breaker_and_clock
    with capture_logs() as logs:
        await fail(breaker, 3)
        with pytest.raises(CircuitOpenError):
            await breaker.call(boom)
    opened = [e for e in logs if e["event"] == "circuit breaker opened"]
    assert len(opened) == 1
    assert opened[0]["log_level"] == "warning"
    assert opened[0]["breaker"] == breaker.name
    assert opened[0]["failures"] == 3
    assert opened[0]["reset_timeout"] == 60.0
    assert opened[0]["shared"] is breaker.shared


# -- shared through Redis -------------------------------------------------------------------


async def test_no_redis_round_trip_while_open(switch: Switch) -> None:
    clock = FakeClock()
    breaker = shared_breaker(switch, clock)
    await fail(breaker, 3)
    before = switch.round_trips
    for _ in range(50):
        clock.advance(0.01)
        with pytest.raises(CircuitOpenError):
            await breaker.call(ok)
    assert switch.round_trips == before  # within the refresh interval: the cache answers
    clock.advance(1.0)
    with pytest.raises(CircuitOpenError):
        await breaker.call(ok)
    assert switch.round_trips == before + 1  # one refresh, and still no transition


async def test_a_cached_open_that_redis_already_closed_lets_calls_through(switch: Switch) -> None:
    clock = FakeClock()
    name = f"pins-{uuid.uuid4().hex[:8]}"
    a, operator = shared_breaker(switch, clock, name), shared_breaker(switch, clock, name)
    await fail(a, 3)
    assert a.state is OPEN
    await operator.reset()  # closed in Redis; A's cache still says open
    with pytest.raises(CircuitOpenError):
        await a.call(ok)  # within A's refresh interval: its cache decides
    clock.advance(1.0)  # the refresh interval: A reads Redis again
    assert await a.call(ok) == "ok"  # long before the 60 s reset timeout
    assert a.state is CLOSED


async def test_a_breaker_opened_elsewhere_rejects_here_within_a_second(switch: Switch) -> None:
    clock = FakeClock()
    name = f"pins-{uuid.uuid4().hex[:8]}"
    a, b = shared_breaker(switch, clock, name), shared_breaker(switch, clock, name)
    assert await b.call(ok) == "ok"
    await fail(a, 3)
    clock.advance(0.999)
    assert await b.call(ok) == "ok"  # b's cached view is still fresh
    clock.advance(0.001)
    with pytest.raises(CircuitOpenError) as rejected:
        await b.call(ok)
    assert rejected.value.retry_after == pytest.approx(59.0)
    assert b.state is OPEN


async def test_redis_down_and_back(switch: Switch) -> None:
    clock = FakeClock()
    breaker = shared_breaker(switch, clock)
    assert await breaker.call(ok) == "ok"
    assert breaker.shared
    with capture_logs() as logs:
        switch.down = True
        clock.advance(1.0)
        await fail(breaker, 1)  # the failure cannot reach Redis: counted locally
        assert not breaker.shared
        attempts = switch.round_trips
        clock.advance(4.9)
        assert await breaker.call(ok) == "ok"
        await fail(breaker, 1)
        assert switch.round_trips == attempts  # Redis is retried every 5 s, no sooner
        clock.advance(5.0)
        await fail(breaker, 1)
        assert switch.round_trips > attempts
        assert not breaker.shared
        switch.down = False
        clock.advance(5.0)
        assert await breaker.call(ok) == "ok"
        assert breaker.shared
        switch.down = True
        clock.advance(1.0)
        await fail(breaker, 1)
    said = [(e["log_level"], e["event"]) for e in logs if "Redis" in e["event"]]
    down = ("warning", "circuit breaker cannot reach Redis; using local state")
    up = ("warning", "circuit breaker state shared through Redis again")
    assert said == [down, up, down]
    assert logs[0]["breaker"] == breaker.name
    assert logs[0]["error"].startswith("ConnectionError: ")


async def test_while_redis_is_down_the_local_state_opens_and_recovers(switch: Switch) -> None:
    clock = FakeClock()
    breaker = shared_breaker(switch, clock)
    switch.down = True
    with capture_logs() as logs:
        await fail(breaker, 3)
    assert breaker.state is OPEN
    opened = [e for e in logs if e["event"] == "circuit breaker opened"]
    assert [e["shared"] for e in opened] == [False]
    clock.advance(60)
    assert await breaker.call(ok) == "ok"
    assert breaker.state is CLOSED


async def test_a_failed_trial_reopens_for_a_full_reset_timeout(
    breaker_and_clock: tuple[FakeClock, CircuitBreaker],
) -> None:
    clock, breaker = breaker_and_clock
    await fail(breaker, 3)
    clock.advance(70)
    await fail(breaker, 1)  # the trial
    clock.advance(59.9)
    with pytest.raises(CircuitOpenError) as rejected:
        await breaker.call(ok)
    assert rejected.value.retry_after == pytest.approx(0.1)
    clock.advance(0.1)
    assert await breaker.call(ok) == "ok"


def test_records_and_decisions_are_immutable_values() -> None:
    record = BreakerRecord()
    assert record == BreakerRecord(CLOSED, 0, 0.0, 0.0, 0.0, 0.0)
    assert record.to_redis()["open_until"] == "0.0"
    assert record.to_redis()["trial_until"] == "0.0"
    assert hash(record) == hash(BreakerRecord())  # a value: usable as a key
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.failures = 1  # type: ignore[misc]
    _, decision = transition(record, "acquire", 0.0, **POLICY)
    assert decision == Decision(allowed=True, trial=False, opened=False)
    assert hash(decision) == hash(Decision())
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.allowed = False  # type: ignore[misc]
    assert not hasattr(record, "__dict__")  # slots: thousands of cached records stay small
    assert not hasattr(decision, "__dict__")


def test_acquire_on_a_closed_record_allows_without_a_trial() -> None:
    record = BreakerRecord(CLOSED, 2, first_failure=1.0, last_failure=2.0)
    after, decision = transition(record, "acquire", 5.0, **POLICY)
    assert after is record
    assert (decision.allowed, decision.trial, decision.opened) == (True, False, False)


async def test_a_cached_open_past_its_timeout_that_redis_closed_runs_as_a_normal_call(
    switch: Switch,
) -> None:
    """The cache (fresh for a long refresh interval) says open and the reset timeout has
    passed; Redis says closed (reset elsewhere): the call runs, not as a trial."""
    clock = FakeClock()
    name = f"pins-{uuid.uuid4().hex[:8]}"
    a = CircuitBreaker(
        name, redis=switch.client, clock=clock, is_failure=counts_boom, refresh_interval=1000
    )
    await fail(a, 3)
    await shared_breaker(switch, clock, name).reset()
    clock.advance(60)
    assert a.state is OPEN  # still the cached view
    assert await a.call(ok) == "ok"
    assert a.state is CLOSED
    await fail(a, 2)
    assert a.state is CLOSED  # a fresh run of failures, not a failed trial


async def test_a_success_on_the_slow_path_resets_the_failures(switch: Switch) -> None:
    clock = FakeClock()
    breaker = shared_breaker(switch, clock)
    await fail(breaker, 2)
    clock.advance(1.0)  # the cache is stale: this call refreshes first
    assert await breaker.call(ok) == "ok"
    await fail(breaker, 2)
    assert breaker.state is CLOSED  # two in a row since the success, not four
    await fail(breaker, 1)
    assert breaker.state is OPEN


async def test_a_new_process_records_no_success_it_never_had(switch: Switch) -> None:
    clock = FakeClock(start=0.0)  # a clock near zero: no success is ever "at 1.0"
    name = f"pins-{uuid.uuid4().hex[:8]}"
    b = shared_breaker(switch, clock, name)
    await fail(b, 2)
    a = shared_breaker(switch, clock, name)
    await fail(a, 1)  # the third failure in a row, fleet-wide
    assert a.state is OPEN


async def test_concurrent_first_calls_all_read_the_shared_state(switch: Switch) -> None:
    clock = FakeClock()
    name = f"pins-{uuid.uuid4().hex[:8]}"
    await fail(shared_breaker(switch, clock, name), 3)  # open, fleet-wide
    fresh = shared_breaker(switch, clock, name)
    ran: list[str] = []

    async def counted() -> str:
        ran.append("ran")
        return "ok"

    outcomes = await asyncio.gather(
        *(fresh.call(counted) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(o, CircuitOpenError) for o in outcomes)
    assert ran == []  # no caller ran on the empty cache of a breaker not yet read


def test_a_new_breaker_shows_closed_at_once() -> None:
    from prometheus_client import REGISTRY

    name = f"pins-new-{uuid.uuid4().hex[:8]}"
    CircuitBreaker(name)
    assert REGISTRY.get_sample_value("llm_circuit_breaker_state", {"breaker": name}) == 0.0


async def test_retry_after_near_the_end_of_a_trial_lease(
    breaker_and_clock: tuple[FakeClock, CircuitBreaker],
) -> None:
    clock, breaker = breaker_and_clock
    await fail(breaker, 3)
    clock.advance(60)
    started, release = asyncio.Event(), asyncio.Event()

    async def slow() -> str:
        started.set()
        await release.wait()
        return "slow"

    trial = asyncio.create_task(breaker.call(slow))
    await asyncio.wait_for(started.wait(), 10)
    clock.advance(59.5)
    with pytest.raises(CircuitOpenError) as rejected:
        await breaker.call(ok)
    assert rejected.value.retry_after == pytest.approx(0.5)
    release.set()
    assert await trial == "slow"


async def test_a_success_recorded_at_refresh_counts_even_if_the_next_call_fails(
    switch: Switch,
) -> None:
    clock = FakeClock()
    name = f"pins-{uuid.uuid4().hex[:8]}"
    a, b = shared_breaker(switch, clock, name), shared_breaker(switch, clock, name)
    assert await a.call(ok) == "ok"
    await fail(b, 1)
    clock.advance(0.2)
    assert await a.call(ok) == "ok"  # not yet told to Redis
    clock.advance(1.0)
    await fail(a, 1)  # the refresh records A's success first, then this failure
    await fail(b, 1)
    assert b.state is CLOSED  # two in a row since A's success
    await fail(b, 1)
    assert b.state is OPEN


async def test_round_trips_of_refreshes_and_unrecorded_successes(switch: Switch) -> None:
    clock = FakeClock()
    name = f"pins-{uuid.uuid4().hex[:8]}"
    a, b = shared_breaker(switch, clock, name), shared_breaker(switch, clock, name)
    assert await a.call(ok) == "ok"  # A's success is unrecorded: nobody failed
    clock.advance(1.0)
    before = switch.round_trips
    assert await a.call(ok) == "ok"
    assert switch.round_trips == before + 1  # the refresh; no success to record
    clock.advance(0.5)
    await fail(b, 1)  # after A's last success
    clock.advance(0.5)
    before = switch.round_trips
    assert await a.call(ok) == "ok"  # refresh: A's success is older than B's failure
    assert switch.round_trips == before + 2  # the refresh, and this call's own success
    await fail(b, 3)
    assert b.state is OPEN
    clock.advance(1.0)
    before = switch.round_trips
    with pytest.raises(CircuitOpenError):
        await a.call(ok)
    assert switch.round_trips == before + 1  # the refresh only: open, nothing to record


async def test_concurrent_calls_share_one_refresh(switch: Switch) -> None:
    clock = FakeClock()
    breaker = shared_breaker(switch, clock)
    await breaker.reset()  # the first contact is a transition, not a read
    clock.advance(1.0)
    assert await breaker.call(ok) == "ok"  # the first read also registers the breaker
    for _ in range(2):
        clock.advance(1.0)
        before = switch.round_trips
        results = await asyncio.gather(*(breaker.call(ok) for _ in range(5)))
        assert results == ["ok"] * 5
        assert switch.round_trips == before + 1  # one read; the others used the cache


async def test_redis_lost_at_a_refresh_falls_back_and_says_so(switch: Switch) -> None:
    clock = FakeClock()
    breaker = shared_breaker(switch, clock)
    assert await breaker.call(ok) == "ok"
    switch.down = True
    clock.advance(1.0)
    with capture_logs() as logs:
        assert await breaker.call(ok) == "ok"  # the refresh fails; the call runs
        attempts = switch.round_trips
        clock.advance(4.0)
        assert await breaker.call(ok) == "ok"
        assert switch.round_trips == attempts  # retried after 5 s, not after 1
    assert not breaker.shared
    assert [e["event"] for e in logs] == ["circuit breaker cannot reach Redis; using local state"]
