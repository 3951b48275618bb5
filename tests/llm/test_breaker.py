"""The breaker's state machine: pure transitions, then the breaker, local and on Redis."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from aura.errors import CircuitOpenError
from aura.events import CircuitState
from aura.llm import BreakerRecord, CircuitBreaker, transition
from tests.helpers import FakeClock, metric, wait_until
from tests.llm.support import POLICY, Boom, boom, ok

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


# -- the pure state machine: exact states in, exact states out ------------------------------


def test_three_failures_open_the_breaker_once() -> None:
    record = BreakerRecord()
    record, first = transition(record, "failure", 100.0, **POLICY)
    record, second = transition(record, "failure", 101.0, **POLICY)
    assert (record.state, record.failures, first.opened, second.opened) == (CLOSED, 2, False, False)
    record, third = transition(record, "failure", 102.0, **POLICY)
    assert third.opened
    assert record == BreakerRecord(
        OPEN, 3, 162.0, 0.0, first_failure=100.0, last_failure=102.0, recent=(100.0, 101.0, 102.0)
    )
    record, straggler = transition(record, "failure", 103.0, **POLICY)
    assert not straggler.opened  # a late failure elsewhere does not open it again
    assert record.open_until == 162.0


def test_a_success_resets_consecutive_failures() -> None:
    record = BreakerRecord(CLOSED, 2)
    record, _ = transition(record, "success", 0.0, **POLICY)
    assert record == BreakerRecord()


def test_the_failure_window_slides_over_the_runs_failures() -> None:
    policy = POLICY | {"failure_window": 10.0}
    record, _ = transition(BreakerRecord(), "failure", 100.0, **policy)
    record, _ = transition(record, "failure", 105.0, **policy)
    record, late = transition(record, "failure", 110.5, **policy)  # 10.5 s after the first
    assert not late.opened  # the first has slid out of the window; two remain
    assert (record.failures, record.first_failure, record.last_failure) == (2, 105.0, 110.5)
    record, third = transition(record, "failure", 115.0, **policy)  # 105-115: three in 10 s
    assert third.opened


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.floats(min_value=0.0, max_value=40.0), min_size=1, max_size=12),
    fail_max=st.integers(min_value=1, max_value=4),
)
def test_it_opens_at_the_first_failure_that_ends_fail_max_within_the_window(
    gaps: list[float], fail_max: int
) -> None:
    """The rule docs/patterns/llm.md states, for any failure times: open at the first failure whose
    fail_max - 1 predecessors are all within the window of it, never before."""
    policy = POLICY | {"fail_max": fail_max, "failure_window": 60.0}
    times = list(itertools.accumulate(gaps))
    record, opened_at = BreakerRecord(), None
    for index, at in enumerate(times):
        record, decision = transition(record, "failure", at, **policy)
        if decision.opened:
            opened_at = index
            break
    expected = next(
        (
            i
            for i in range(len(times))
            if i + 1 >= fail_max and times[i] - times[i + 1 - fail_max] <= 60.0
        ),
        None,
    )
    assert opened_at == expected


def test_the_readmes_example_failures_at_0_50_100_105_open_a_60_s_window() -> None:
    policy = POLICY | {"failure_window": 60.0}
    record = BreakerRecord()
    opened = []
    for at in (0.0, 50.0, 100.0, 105.0):
        record, decision = transition(record, "failure", at, **policy)
        opened.append(decision.opened)
    assert opened == [False, False, False, True]  # 50, 100, 105: three within 60 s


def test_a_success_older_than_the_latest_failure_does_not_break_the_run() -> None:
    record, _ = transition(BreakerRecord(), "failure", 100.0, **POLICY)
    record, _ = transition(record, "failure", 102.0, **POLICY)
    stale, _ = transition(record, "success", 101.0, **POLICY)  # recorded late, happened before
    assert stale == record
    fresh, _ = transition(record, "success", 102.5, **POLICY)
    assert fresh == BreakerRecord()


def test_open_rejects_until_the_reset_timeout_then_leases_one_trial() -> None:
    record = BreakerRecord(OPEN, 3, 162.0)
    same, denied = transition(record, "acquire", 161.9, **POLICY)
    assert (same, denied.allowed) == (record, False)
    leased, granted = transition(record, "acquire", 162.0, **POLICY)
    assert granted.allowed
    assert granted.trial
    assert leased == BreakerRecord(HALF_OPEN, 3, 162.0, 197.0)
    _, second = transition(leased, "acquire", 170.0, **POLICY)
    assert not second.allowed  # exactly one trial while the lease runs
    _, after_lease = transition(leased, "acquire", 197.0, **POLICY)
    assert after_lease.trial  # a trial holder that died does not wedge the breaker


def test_trial_outcomes() -> None:
    half_open = BreakerRecord(HALF_OPEN, 3, 162.0, 197.0)
    closed, _ = transition(half_open, "trial_success", 170.0, **POLICY)
    assert closed == BreakerRecord()
    reopened, decision = transition(half_open, "trial_failure", 170.0, **POLICY)
    assert decision.opened
    assert reopened == BreakerRecord(OPEN, 3, 230.0, 0.0)
    abandoned, _ = transition(half_open, "trial_abandoned", 170.0, **POLICY)
    assert abandoned == BreakerRecord(OPEN, 3, 162.0, 0.0)


def test_unknown_event_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown breaker event 'explode'"):
        transition(BreakerRecord(), "explode", 0.0, **POLICY)


# -- the breaker, local and shared ------------------------------------------------------------


async def test_breaker_opens_rejects_and_recovers(
    breaker_and_clock: tuple[FakeClock, CircuitBreaker],
) -> None:
    clock, breaker = breaker_and_clock
    opens = metric("llm_circuit_breaker_opens_total")
    assert await breaker.call(ok) == "ok"
    for _ in range(3):
        with pytest.raises(Boom):
            await breaker.call(boom)
    assert breaker.state is OPEN
    assert metric("llm_circuit_breaker_opens_total") == opens + 1
    assert metric("llm_circuit_breaker_state", breaker=breaker.name) == 2

    calls: list[str] = []

    async def counted() -> str:
        calls.append("called")
        return "ok"

    clock.advance(30)
    with pytest.raises(CircuitOpenError) as rejected:
        await breaker.call(counted)
    assert calls == []  # failing fast: the protected call never ran
    assert rejected.value.retry_after == pytest.approx(30.0)

    clock.advance(30)  # the reset timeout has passed: one trial call
    assert await breaker.call(counted) == "ok"
    assert calls == ["called"]
    assert breaker.state is CLOSED
    assert metric("llm_circuit_breaker_state", breaker=breaker.name) == 0


async def test_a_failed_trial_opens_again(
    breaker_and_clock: tuple[FakeClock, CircuitBreaker],
) -> None:
    clock, breaker = breaker_and_clock
    for _ in range(3):
        with pytest.raises(Boom):
            await breaker.call(boom)
    opens = metric("llm_circuit_breaker_opens_total")
    clock.advance(60)
    with pytest.raises(Boom):
        await breaker.call(boom)  # the trial
    assert breaker.state is OPEN
    assert metric("llm_circuit_breaker_opens_total") == opens + 1
    clock.advance(59)
    with pytest.raises(CircuitOpenError):
        await breaker.call(ok)


async def test_errors_that_do_not_count_leave_it_closed(
    breaker_and_clock: tuple[FakeClock, CircuitBreaker],
) -> None:
    _, breaker = breaker_and_clock

    async def bad_request() -> str:
        raise ValueError("400: your request is wrong")

    for _ in range(5):
        with pytest.raises(ValueError, match="400"):
            await breaker.call(bad_request)
    assert breaker.state is CLOSED
    assert await breaker.call(ok) == "ok"


async def test_successes_between_failures_keep_it_closed(
    breaker_and_clock: tuple[FakeClock, CircuitBreaker],
) -> None:
    _, breaker = breaker_and_clock
    for _ in range(4):
        for _ in range(2):
            with pytest.raises(Boom):
                await breaker.call(boom)
        await breaker.call(ok)
    assert breaker.state is CLOSED


async def test_a_shared_breaker_makes_no_redis_round_trip_on_closed_successes(
    redis_url: str,
) -> None:
    clock = FakeClock()
    client = aioredis.from_url(redis_url)
    breaker = CircuitBreaker(f"rt-{uuid.uuid4().hex[:8]}", redis=client, clock=clock)
    sent: list[tuple[object, ...]] = []
    real_execute = client.execute_command

    async def counting(*args: object, **kwargs: object) -> object:
        sent.append(args)
        return await real_execute(*args, **kwargs)

    client.execute_command = counting  # type: ignore[method-assign]
    try:
        await breaker.call(ok)  # the first call reads the shared state once
        reads = len(sent)
        assert [command for command, *_ in sent] == ["HGETALL", "ZADD"]  # and registers
        for _ in range(1000):
            await breaker.call(ok)
        assert len(sent) == reads  # no round trip of its own in 1,000 calls
        clock.advance(1.0)  # ... and a refresh at most once per second
        for _ in range(10):
            await breaker.call(ok)
        assert len(sent) == reads + 1
    finally:
        await client.aclose()


async def test_redis_down_falls_back_to_local_state_and_logs_once() -> None:
    clock = FakeClock()
    dead = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    breaker = CircuitBreaker("fallback", redis=dead, clock=clock, redis_retry_interval=5)
    with structlog.testing.capture_logs() as logged:
        assert await breaker.call(ok) == "ok"
        for _ in range(3):
            with pytest.raises(Boom):
                await breaker.call(boom)
            clock.advance(6)  # every failure would retry Redis: still one log line
        assert breaker.state is OPEN  # the breaker kept working on local state
        with pytest.raises(CircuitOpenError):
            await breaker.call(ok)
    assert not breaker.shared
    warnings = [e for e in logged if "cannot reach Redis" in e["event"]]
    assert len(warnings) == 1
    await dead.aclose()


async def test_a_cancelled_trial_lets_the_next_caller_try(
    breaker_and_clock: tuple[FakeClock, CircuitBreaker],
) -> None:
    import asyncio

    clock, breaker = breaker_and_clock
    for _ in range(3):
        with pytest.raises(Boom):
            await breaker.call(boom)
    clock.advance(60)
    started = asyncio.Event()

    async def slow() -> str:
        started.set()
        await asyncio.Event().wait()  # never finishes on its own
        return "never"

    trial = asyncio.create_task(breaker.call(slow))
    await started.wait()
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    assert await breaker.call(ok) == "ok"  # not wedged until the lease runs out
    assert breaker.state is CLOSED


# -- the opening rule across processes (two breakers on one Redis: two processes' caches) --


@pytest.fixture
async def two_processes(
    redis_url: str,
) -> AsyncIterator[tuple[FakeClock, CircuitBreaker, CircuitBreaker]]:
    clock = FakeClock()
    client = aioredis.from_url(redis_url)
    name = f"rule-{uuid.uuid4().hex[:8]}"

    def breaker() -> CircuitBreaker:
        return CircuitBreaker(
            name, redis=client, clock=clock, is_failure=lambda exc: isinstance(exc, Boom)
        )

    yield clock, breaker(), breaker()
    await client.aclose()


async def test_a_success_the_other_process_had_within_its_refresh_interval_may_not_count(
    two_processes: tuple[FakeClock, CircuitBreaker, CircuitBreaker],
) -> None:
    """The issue's sequence, within one refresh interval: fail B, succeed A, fail B, fail
    B opens the breaker. This is the documented limit, kept honest by a test."""
    clock, a, b = two_processes
    assert await a.call(ok) == "ok"  # A's view: closed, no failures, fresh for 1 s
    with pytest.raises(Boom):
        await b.call(boom)
    clock.advance(0.2)
    assert await a.call(ok) == "ok"  # A does not know of B's failure: no round trip
    for _ in range(2):
        clock.advance(0.2)
        with pytest.raises(Boom):
            await b.call(boom)
    assert b.state is OPEN


async def test_a_success_is_recorded_with_the_next_refresh_and_breaks_the_run(
    two_processes: tuple[FakeClock, CircuitBreaker, CircuitBreaker],
) -> None:
    clock, a, b = two_processes
    assert await a.call(ok) == "ok"
    with pytest.raises(Boom):
        await b.call(boom)
    clock.advance(0.2)
    assert await a.call(ok) == "ok"  # unrecorded yet
    clock.advance(1.0)
    assert await a.call(ok) == "ok"  # A refreshes, sees B's failure older than its success
    for _ in range(2):
        with pytest.raises(Boom):
            await b.call(boom)
    assert b.state is CLOSED  # fail, success, fail, fail: two in a row, not three
    with pytest.raises(Boom):
        await b.call(boom)
    assert b.state is OPEN


async def test_failures_recorded_by_different_processes_add_up_within_the_window(
    two_processes: tuple[FakeClock, CircuitBreaker, CircuitBreaker],
) -> None:
    clock, a, b = two_processes
    with pytest.raises(Boom):
        await a.call(boom)
    clock.advance(30)
    with pytest.raises(Boom):
        await b.call(boom)
    clock.advance(31)  # 61 s after the first failure: a new run begins
    with pytest.raises(Boom):
        await a.call(boom)
    assert a.state is CLOSED
    with pytest.raises(Boom):
        await b.call(boom)
    with pytest.raises(Boom):
        await a.call(boom)
    assert a.state is OPEN


# -- under load: hundreds of calls in flight in one process --------------------------------


class RoundTrips:
    """Counts a client's Redis work: single commands, and transactions (WATCH/MULTI)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.commands: list[object] = []
        self.transactions = 0
        real_execute, real_transaction = client.execute_command, client.transaction

        async def execute(*args: object, **kwargs: object) -> object:
            self.commands.append(args[0])
            return await real_execute(*args, **kwargs)

        async def transaction(*args: object, **kwargs: object) -> object:
            self.transactions += 1
            return await real_transaction(*args, **kwargs)  # type: ignore[arg-type]

        client.execute_command = execute  # type: ignore[method-assign]
        client.transaction = transaction  # type: ignore[method-assign]


@pytest.fixture
async def shared(redis_url: str) -> AsyncIterator[tuple[FakeClock, CircuitBreaker, RoundTrips]]:
    clock = FakeClock()
    client = aioredis.from_url(redis_url)
    breaker = CircuitBreaker(
        f"load-{uuid.uuid4().hex[:8]}",
        redis=client,
        clock=clock,
        fail_max=3,
        reset_timeout=60,
        is_failure=lambda exc: isinstance(exc, Boom),
    )
    yield clock, breaker, RoundTrips(client)
    await client.aclose()


async def together(n: int, call: Callable[[], Awaitable[str]]) -> list[object]:
    """``n`` calls in flight at once; what each returned or raised."""
    return await asyncio.gather(*(call() for _ in range(n)), return_exceptions=True)


async def test_callers_arriving_before_the_first_read_share_it(
    shared: tuple[FakeClock, CircuitBreaker, RoundTrips],
) -> None:
    _, breaker, trips = shared
    assert await together(200, lambda: breaker.call(ok)) == ["ok"] * 200
    assert trips.commands == ["HGETALL", "ZADD"]  # its state; its name, for status


async def test_two_hundred_failures_at_once_are_one_or_two_transactions_and_one_open(
    shared: tuple[FakeClock, CircuitBreaker, RoundTrips],
) -> None:
    _, breaker, trips = shared
    await breaker.call(ok)
    opens = metric("llm_circuit_breaker_opens_total")

    async def fails() -> str:
        await asyncio.sleep(0)  # in flight together, as a provider outage finds them
        raise Boom("down")

    outcomes = await together(200, lambda: breaker.call(fails))
    assert all(isinstance(outcome, Boom) for outcome in outcomes)
    assert breaker.state is OPEN
    # the first failure's report, then the 199 that came meanwhile as one batch (which
    # opens it); none after: once open here, the stragglers tell nothing
    assert trips.transactions == 2
    assert metric("llm_circuit_breaker_opens_total") == opens + 1


async def test_successes_after_a_failure_end_the_run_in_one_transaction(
    shared: tuple[FakeClock, CircuitBreaker, RoundTrips],
) -> None:
    _, breaker, trips = shared
    with pytest.raises(Boom):
        await breaker.call(boom)
    trips.transactions = 0

    async def answers() -> str:
        await asyncio.sleep(0)
        return "ok"

    assert await together(200, lambda: breaker.call(answers)) == ["ok"] * 200
    assert trips.transactions == 1  # not one per success
    for _ in range(2):  # the run was ended: two more failures do not open it
        with pytest.raises(Boom):
            await breaker.call(boom)
    assert breaker.state is CLOSED


async def test_a_due_trial_costs_one_round_trip_per_process_not_one_per_caller(
    shared: tuple[FakeClock, CircuitBreaker, RoundTrips],
) -> None:
    clock, breaker, trips = shared
    for _ in range(3):
        with pytest.raises(Boom):
            await breaker.call(boom)
    clock.advance(60)
    trips.transactions = 0
    release = asyncio.Event()
    first = True

    async def trial_or_not() -> str:
        nonlocal first
        if first:  # the one call that got the trial holds it until released
            first = False
            await release.wait()
        return "ok"

    calls = [asyncio.create_task(breaker.call(trial_or_not)) for _ in range(200)]

    async def all_but_the_trial_done() -> bool:
        return sum(call.done() for call in calls) == 199

    await wait_until(all_but_the_trial_done)
    (trial,) = [call for call in calls if not call.done()]
    outcomes = [call.exception() for call in calls if call.done()]
    assert all(isinstance(outcome, CircuitOpenError) for outcome in outcomes)
    # rejected while the trial was being asked for, or while it ran: never "now"
    assert all(outcome.retry_after > 0 for outcome in outcomes)  # type: ignore[union-attr]
    assert trips.transactions == 1  # the trial's lease; the other 199 asked nobody
    release.set()
    assert await trial == "ok"
    assert breaker.state is CLOSED
    assert breaker.state is CLOSED


async def test_a_failure_while_open_here_asks_redis_nothing(
    shared: tuple[FakeClock, CircuitBreaker, RoundTrips],
) -> None:
    _, breaker, trips = shared
    release = asyncio.Event()

    async def late_failure() -> str:
        await release.wait()
        raise Boom("a straggler")

    straggler = asyncio.create_task(breaker.call(late_failure))
    for _ in range(3):
        with pytest.raises(Boom):
            await breaker.call(boom)
    assert breaker.state is OPEN
    trips.transactions = 0
    release.set()
    with pytest.raises(Boom):
        await straggler
    assert trips.transactions == 0


def test_the_open_error_is_cheap_to_make_and_still_says_everything() -> None:
    import pickle

    error = CircuitOpenError("llm:host/model", 12.34)
    assert str(error) == "circuit breaker 'llm:host/model' is open; trial call in 12.3s"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.name, copy.retry_after, str(copy)) == (error.name, 12.34, str(error))


async def _refused_during_a_trial(
    clock: FakeClock, breaker: CircuitBreaker, trial: Callable[[], Awaitable[str]]
) -> asyncio.Task[str]:
    for _ in range(3):
        with pytest.raises(Boom):
            await breaker.call(boom)
    clock.advance(60)
    started = asyncio.Event()

    async def the_trial() -> str:
        started.set()
        return await trial()

    running = asyncio.create_task(breaker.call(the_trial))
    await started.wait()
    with pytest.raises(CircuitOpenError) as refused:  # a caller that came meanwhile
        await breaker.call(ok)
    assert refused.value.retry_after > 30  # the trial's lease: what it was deferred by
    assert breaker.state is HALF_OPEN
    return running


@pytest.mark.parametrize("outcome", ["succeeds", "fails"])
async def test_a_caller_refused_during_a_trial_learns_its_outcome_within_a_refresh(
    breaker_and_clock: tuple[FakeClock, CircuitBreaker], outcome: str
) -> None:
    """The trial's outcome is a second or so away, not its lease (35 s more were seen)."""
    clock, breaker = breaker_and_clock
    done = asyncio.Event()

    async def trial() -> str:
        await done.wait()
        if outcome == "fails":
            raise Boom("still down")
        return "ok"

    running = await _refused_during_a_trial(clock, breaker, trial)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:  # the trial ends during the first look
        slept.append(seconds)
        clock.advance(seconds)
        done.set()
        await asyncio.sleep(0)

    closed = await breaker.wait_for_trial(5.0, sleep=sleep)
    assert closed is (outcome == "succeeds")
    assert sum(slept) <= 1.0  # one refresh interval
    if closed:
        assert await breaker.call(ok) == "ok"
        assert await running == "ok"
    else:
        with pytest.raises(Boom):
            await running


async def test_waiting_for_a_trial_is_bounded(
    breaker_and_clock: tuple[FakeClock, CircuitBreaker],
) -> None:
    clock, breaker = breaker_and_clock
    never = asyncio.Event()

    async def trial() -> str:
        await never.wait()
        return "ok"

    running = await _refused_during_a_trial(clock, breaker, trial)

    async def sleep(seconds: float) -> None:
        clock.advance(seconds)
        await asyncio.sleep(0)

    assert await breaker.wait_for_trial(3.0, sleep=sleep) is False
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
