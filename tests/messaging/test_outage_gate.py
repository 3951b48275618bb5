"""The outage gate's state machine (``aura.messaging._gate``), on a fake clock: one trial
at a time, pauses that double to the cap, a lost trial's turn handed on, every waiter
released by a trial that worked. A hypothesis model checks the invariants over any
sequence of events."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aura.events import Dependency
from aura.messaging._gate import OutageGate
from tests.helpers import FakeClock, metric


def gate(clock: FakeClock, **options: float) -> OutageGate:
    return OutageGate(Dependency.DATABASE, clock=clock, rng=random.Random(7), **options)


def test_open_lets_everyone_through_and_an_outage_closes_it() -> None:
    clock = FakeClock()
    g = gate(clock)
    assert g.try_enter() is True
    g.failed("too many clients")
    assert not g.is_open
    assert metric("aura_dependency_available", dependency="database") == 0
    assert g.try_enter() is None  # the first trial waits for its pause
    clock.advance(g.wait_hint())
    assert g.try_enter() is False  # the trial
    assert g.try_enter() is None  # one at a time
    g.succeeded()
    assert g.is_open
    assert g.try_enter() is True
    assert metric("aura_dependency_available", dependency="database") == 1


def test_pauses_double_to_the_cap_so_recovery_is_seen_within_it() -> None:
    clock = FakeClock()
    g = gate(clock, first_pause=0.1, max_pause=1.0)
    pauses = []
    for _ in range(8):
        g.failed()
        pauses.append(g.wait_hint())
        clock.advance(g.wait_hint())
        assert g.try_enter() is False
    ceilings = [min(1.0, 0.1 * 2**n) for n in range(8)]
    for pause, ceiling in zip(pauses, ceilings, strict=True):
        assert ceiling / 2 <= pause <= ceiling
    assert max(pauses) <= 1.0


def test_a_trial_that_never_reports_hands_its_turn_on_after_its_lease() -> None:
    clock = FakeClock()
    g = gate(clock, trial_lease=5.0)
    g.failed()
    clock.advance(g.wait_hint())
    assert g.try_enter() is False
    clock.advance(4.9)
    assert g.try_enter() is None
    clock.advance(0.1)
    assert g.try_enter() is False  # the next trial


def test_a_released_trial_lets_the_next_waiter_try_at_once() -> None:
    clock = FakeClock()
    g = gate(clock)
    g.failed()
    clock.advance(g.wait_hint())
    assert g.try_enter() is False
    g.released(g.trial_out_since)  # a poison pill: it said nothing about the database
    assert g.try_enter() is False


def test_a_trial_gives_back_only_its_own_turn() -> None:
    clock = FakeClock()
    g = gate(clock)
    g.failed()
    clock.advance(g.wait_hint())
    assert g.try_enter() is False
    first = g.trial_out_since
    g.succeeded()  # the first trial worked; much later the database is out again
    clock.advance(10)
    g.failed()
    clock.advance(g.wait_hint())
    assert g.try_enter() is False  # a second trial
    g.released(first)  # the first delivery ends only now: not its turn to give back
    assert g.try_enter() is None  # one trial at a time still


async def test_waiters_are_released_together_when_a_trial_works() -> None:
    g = OutageGate(Dependency.DATABASE, first_pause=0.01, max_pause=0.02)
    g.failed()
    waiters = [asyncio.create_task(g.admit(30.0)) for _ in range(20)]
    trial = None
    while trial is None:  # the one trial comes out first; the others keep waiting
        await asyncio.sleep(0.005)
        trial = next((w for w in waiters if w.done()), None)
    assert trial.result() is False
    assert g.held == 19
    g.succeeded()
    results = await asyncio.wait_for(asyncio.gather(*waiters), 5.0)
    assert sorted(results, key=str) == [False] + [True] * 19
    assert g.held == 0


async def test_a_waiter_past_its_bound_gets_none() -> None:
    g = OutageGate(Dependency.DATABASE, first_pause=60.0, max_pause=60.0)
    g.failed()
    assert await asyncio.wait_for(g.admit(0.05), 5.0) is None
    assert g.held == 0


EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.floats(0.0, 3.0)),
        st.tuples(st.sampled_from(["failed", "succeeded", "released", "enter"]), st.just(0.0)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(EVENTS)
def test_at_most_one_trial_and_never_a_trial_before_its_time(
    events: list[tuple[str, float]],
) -> None:
    clock = FakeClock()
    g = gate(clock, first_pause=0.1, max_pause=1.0, trial_lease=2.0)
    trial_since: float | None = None
    for kind, amount in events:
        if kind == "advance":
            clock.advance(amount)
        elif kind == "failed":
            g.failed()
            trial_since = None
        elif kind == "succeeded":
            g.succeeded()
            trial_since = None
        elif kind == "released":
            g.released(g.trial_out_since)
            trial_since = None
        else:
            was_open, due = g.is_open, g.trial_at
            entered = g.try_enter()
            if was_open:
                assert entered is True
            elif entered is False:  # a trial: none running (or its lease over), and due
                assert trial_since is None or clock() - trial_since >= 2.0
                assert clock() >= due
                trial_since = clock()
            else:
                assert entered is None
        assert g.failures == 0 or not g.is_open
        if not g.is_open:
            assert g.trial_at - clock() <= 1.0 or kind != "failed"


@pytest.mark.parametrize("failures", [1, 5, 40])
def test_the_next_trial_is_never_more_than_the_cap_away(failures: int) -> None:
    clock = FakeClock()
    g = gate(clock, first_pause=0.1, max_pause=1.0)
    for _ in range(failures):
        g.failed()
    assert 0 < g.wait_hint() <= 1.0
