"""The HA scenarios' measures (``aura.chaos.throughput``) as pure functions over commit
timestamps: the rate, the time to recover it, the per-second timeline."""

from __future__ import annotations

from aura.chaos.throughput import rate, recovered_after, timeline


def steady(start: float, end: float, per_s: int) -> list[float]:
    count = int((end - start) * per_s)
    return [start + n / per_s for n in range(count)]


def test_rate_counts_stamps_in_a_half_open_interval() -> None:
    stamps = [0.0, 0.5, 1.0, 1.5, 2.0]
    assert rate(stamps, 0.0, 2.0) == 2.0
    assert rate(stamps, 1.0, 1.0) == 0.0


def test_no_dip_is_recovered_at_once() -> None:
    stamps = steady(0, 20, 30)
    assert recovered_after(stamps, 10.0, 30.0) == 0.0


def test_a_gap_is_recovered_once_a_whole_window_is_back_to_the_share() -> None:
    stamps = steady(0, 10, 30) + steady(13, 30, 30)  # nothing for 3 s after the crash
    recovery = recovered_after(stamps, 10.0, 30.0, share=0.9, window=2.0)
    assert recovery is not None
    assert 2.7 <= recovery <= 3.0  # the first window with >= 27/s starts 0.2 s before 13


def test_a_rate_that_never_comes_back_is_none() -> None:
    stamps = steady(0, 10, 30) + steady(10, 30, 10)
    assert recovered_after(stamps, 10.0, 30.0) is None


def test_the_timeline_counts_whole_seconds_around_the_crash() -> None:
    stamps = steady(0, 10, 4) + steady(12, 14, 4)
    assert timeline(stamps, 10.0, 2, 4) == [4, 4, 0, 0, 4, 4]
