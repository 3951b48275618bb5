"""Tenants' fair share (``aura.tenancy``): deficit round robin, property-tested."""

from __future__ import annotations

import math
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aura.tenancy import FairShare, parse_tenant_weights

backlogs = st.dictionaries(st.sampled_from("ABCDEFGH"), st.integers(0, 5000), max_size=8)
weights = st.dictionaries(st.sampled_from("ABCDEFGH"), st.sampled_from([0.25, 0.5, 1, 2, 3]))


@settings(max_examples=300, deadline=None)
@given(backlogs, st.integers(0, 1000), weights)
def test_a_round_gives_all_the_room_it_can_and_never_more_than_is_waiting(
    backlog: dict[str, int], room: int, weight: dict[str, float]
) -> None:
    quotas = FairShare(lambda t: weight.get(t, 1.0)).quotas(backlog, room)
    assert all(0 < quotas[t] <= backlog[t] for t in quotas)
    assert sum(quotas.values()) == min(room, sum(backlog.values()))  # work-conserving


@settings(max_examples=300, deadline=None)
@given(backlogs, st.integers(1, 1000), weights)
def test_a_tenant_left_waiting_got_at_least_its_weighted_share_of_any_other(
    backlog: dict[str, int], room: int, weight: dict[str, float]
) -> None:
    """Max-min fairness: whoever is not fully served got, for its weight, no less than
    anyone else (within the one unit rounding moves)."""
    quotas = FairShare(lambda t: weight.get(t, 1.0)).quotas(backlog, room)
    for starved in (t for t in backlog if quotas.get(t, 0) < backlog[t]):
        mine = (quotas.get(starved, 0) + 1) / weight.get(starved, 1.0)
        for other, got in quotas.items():
            assert mine >= (got - 1) / weight.get(other, 1.0) - 1e-9


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 40), st.integers(1, 5))
def test_no_tenant_starves_when_the_room_is_smaller_than_the_tenants(
    tenants: int, room: int
) -> None:
    share: FairShare[int] = FairShare()
    backlog = dict.fromkeys(range(tenants), 10_000)
    served: dict[int, int] = {}
    rounds = math.ceil(tenants / room) + 1
    for _ in range(rounds):
        for tenant, units in share.quotas(backlog, room).items():
            served[tenant] = served.get(tenant, 0) + units
    assert set(served) == set(backlog)


def test_a_small_tenant_goes_whole_and_the_big_one_takes_the_rest() -> None:
    share: FairShare[str] = FairShare()
    assert share.quotas({"A": 20_000, "B": 10}, 200) == {"A": 190, "B": 10}
    weighted: FairShare[str] = FairShare(lambda t: 3.0 if t == "A" else 1.0)
    assert weighted.quotas({"A": 20_000, "B": 5_000}, 200) == {"A": 150, "B": 50}
    assert share.quotas({"A": 5}, 0) == {}


def test_tenant_weights_parse_and_refuse_what_is_not_a_weight() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    assert parse_tenant_weights(f" {a}=2, {str(b).upper()}=0.5 ,") == {str(a): 2.0, str(b): 0.5}
    assert parse_tenant_weights("") == {}
    for bad in (f"{a}=0", f"{a}=-1", f"{a}=nan", f"{a}", f"{a}=x", "nope=1", f"{a}=1,{a}=2"):
        with pytest.raises(ValueError, match=r"tenant id|weight|twice"):
            parse_tenant_weights(bad)
