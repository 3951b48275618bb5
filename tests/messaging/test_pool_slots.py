"""The async pool's slots (``aura.messaging.pool._Slots``): never more than N held; a freed
slot goes to the oldest priority waiter, else the oldest other, unless an other has waited
``max_wait`` (then it goes first); a cancelled waiter takes nothing and loses nothing.
A fake clock: nothing here sleeps."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aura.messaging.pool import _queue, _Slots, _tenant


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Holders:
    """Tasks that take a slot, note when they got it, and hold it until told."""

    def __init__(self, slots: _Slots) -> None:
        self.slots = slots
        self.order: list[str] = []
        self.release: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, *, first: bool, tenant: str | None = None) -> None:
        self.release[name] = asyncio.Event()

        async def hold() -> None:
            async with self.slots.held(first=first, tenant=tenant):
                self.order.append(name)
                await self.release[name].wait()

        self.tasks[name] = asyncio.create_task(hold())

    @property
    def holding(self) -> set[str]:
        return {n for n in self.order if not self.tasks[n].done()}

    async def settle(self) -> None:
        for _ in range(5):
            await asyncio.sleep(0)


async def test_a_freed_slot_goes_to_the_oldest_priority_waiter_then_the_oldest_other() -> None:
    holders = Holders(_Slots(2, max_wait=5.0, clock=Clock()))
    for name, first in (("a", False), ("b", False), ("c", False), ("d", True), ("e", True)):
        holders.start(name, first=first)
    await holders.settle()
    assert holders.order == ["a", "b"]
    for done in ("a", "b", "d", "c"):
        holders.release[done].set()
        await holders.settle()
    assert holders.order == ["a", "b", "d", "e", "c"]
    assert holders.holding == {"e"}


async def test_an_other_that_waited_max_wait_goes_before_priority_waiters() -> None:
    clock = Clock()
    holders = Holders(_Slots(1, max_wait=5.0, clock=clock))
    holders.start("running", first=True)
    await holders.settle()
    holders.start("bulk", first=False)
    await holders.settle()
    clock.now = 4.9
    holders.start("urgent-1", first=True)
    await holders.settle()
    holders.release["running"].set()
    await holders.settle()
    assert holders.order == ["running", "urgent-1"]  # bulk waited 4.9 s: passed over
    holders.start("urgent-2", first=True)
    clock.now = 5.0
    await holders.settle()
    holders.release["urgent-1"].set()
    await holders.settle()
    assert holders.order == ["running", "urgent-1", "bulk"]  # 5 s: its turn


async def test_a_cancelled_waiter_takes_no_slot_and_a_granted_one_passes_it_on() -> None:
    slots = _Slots(1, max_wait=5.0, clock=Clock())
    holders = Holders(slots)
    holders.start("a", first=False)
    holders.start("b", first=True)
    holders.start("c", first=False)
    await holders.settle()
    holders.tasks["b"].cancel()  # waiting: leaves nothing behind
    await holders.settle()
    holders.release["a"].set()
    await holders.settle()
    assert holders.order == ["a", "c"]
    holders.release["c"].set()
    await holders.settle()
    assert slots.free == 1

    async with slots.held(first=False):
        waiter = asyncio.create_task(slots.held(first=True).__aenter__())
        await holders.settle()
    waiter.cancel()  # granted as the holder left, cancelled before it ran
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert slots.free == 1


async def test_a_freed_slot_goes_to_the_tenant_holding_the_fewest_whatever_came_first() -> None:
    holders = Holders(_Slots(3, max_wait=5.0, clock=Clock()))
    for i in range(6):  # tenant A fills the slots and queues three more
        holders.start(f"a{i}", first=True, tenant="A")
    await holders.settle()
    holders.start("b0", first=False, tenant="B")  # a bulk task of B, after all of A's
    holders.start("b1", first=False, tenant="B")
    await holders.settle()
    holders.release["a0"].set()
    await holders.settle()
    assert holders.order[-1] == "b0"  # B held none: it goes before A's older waiters
    holders.release["a1"].set()
    await holders.settle()
    assert holders.order[-1] == "a3"  # A holds 1 (a2), B 1: a tie goes to the oldest
    holders.release["b0"].set()
    await holders.settle()
    assert holders.order[-1] == "b1"  # A holds 2, B none


async def test_a_heavier_tenant_holds_more_slots_in_proportion() -> None:
    weights = {"A": 3.0, "B": 1.0}
    slots = _Slots(4, max_wait=5.0, clock=Clock(), weight=lambda t: weights.get(t or "", 1.0))
    holders = Holders(slots)
    holders.start("x", first=False, tenant="C")
    await holders.settle()
    for i in range(8):
        holders.start(f"a{i}", first=False, tenant="A")
        holders.start(f"b{i}", first=False, tenant="B")
    await holders.settle()  # a0, b0, a1 took the three free slots
    holders.release["x"].set()
    await holders.settle()
    assert slots.holding("A") == 3
    assert slots.holding("B") == 1


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("take"), st.tuples(st.booleans(), st.sampled_from("ABC"))),
        st.tuples(st.just("release"), st.integers(0, 50)),
        st.tuples(st.just("cancel"), st.integers(0, 50)),
        st.tuples(st.just("tick"), st.floats(0.0, 4.0)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(limit=st.integers(1, 4), ops=_OPS)
def test_never_more_than_the_limit_and_no_slot_is_ever_lost(
    limit: int, ops: list[tuple[str, Any]]
) -> None:
    async def main() -> None:
        clock = Clock()
        slots = _Slots(limit, max_wait=5.0, clock=clock)
        holders = Holders(slots)
        for index, (op, value) in enumerate(ops):
            if op == "take":
                holders.start(f"t{index}", first=value[0], tenant=value[1])
            elif op == "release" and holders.holding:
                holders.release[sorted(holders.holding)[value % len(holders.holding)]].set()
            elif op == "cancel":
                waiting = sorted(n for n, t in holders.tasks.items() if not t.done())
                if waiting:
                    holders.tasks[waiting[value % len(waiting)]].cancel()
            else:
                clock.now += value
            await holders.settle()
            assert len(holders.holding) <= limit
            live = [t for t in holders.tasks.values() if not t.done()]
            assert len(holders.holding) == min(limit, len(live))  # no slot idles while one waits
        for event in holders.release.values():
            event.set()
        await asyncio.gather(*holders.tasks.values(), return_exceptions=True)
        assert slots.free == limit

    asyncio.run(main())


@pytest.mark.parametrize(
    ("args", "queue"),
    [
        (("t", "id", {"delivery_info": {"routing_key": "realtime_queue"}}), "realtime_queue"),
        (("t", "id", {"delivery_info": {"routing_key": "delayed.3.bulk_queue"}}), "bulk_queue"),
        (("t", "id", {"delivery_info": {}}), None),
        (("t", "id", {}), None),
        ((), None),
        (None, None),
    ],
)
def test_the_queue_of_a_delivery_is_read_from_its_routing_key(args: Any, queue: str | None) -> None:
    assert _queue(args) == queue


def test_the_tenant_of_a_delivery_is_its_header_or_nobody() -> None:
    assert _tenant(("t", "id", {"aura_tenant": "7f1c"})) == "7f1c"
    for args in (("t", "id", {}), ("t", "id", {"aura_tenant": 5}), ("t", "id", None), ()):
        assert _tenant(args) is None
    assert _tenant(("t", "id", {"aura_tenant": "x" * 65})) is None
