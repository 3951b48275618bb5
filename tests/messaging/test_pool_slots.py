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

from aura.messaging.pool import _queue, _Slots


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

    def start(self, name: str, *, first: bool) -> None:
        self.release[name] = asyncio.Event()

        async def hold() -> None:
            async with self.slots.held(first=first):
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


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("take"), st.booleans()),
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
                holders.start(f"t{index}", first=value)
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
