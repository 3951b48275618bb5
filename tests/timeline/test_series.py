"""The timeline's data model: gaps stay gaps, every number in the JSON is finite."""

from __future__ import annotations

import json
import math

from aura.timeline import Group, Timeline, Window
from aura.timeline.records import per_second, percentile
from aura.timeline.series import finite, table_rows


def test_a_series_new_or_missing_at_a_sample_is_a_gap_not_a_zero() -> None:
    group = Group("fates", "Fates", "messages")
    group.add(0.0, {"committed": 1})
    group.add(1.0, {"committed": 2, "retried": 1})
    group.add(2.0, {"retried": 3})
    group.add(3.0, {})
    assert group.x == [0.0, 1.0, 2.0, 3.0]
    assert group.series == {"committed": [1, 2, None, None], "retried": [None, 1, 3, None]}


def test_nan_and_infinities_become_null_in_the_json() -> None:
    assert finite(math.nan) is None
    assert finite(math.inf) is None
    assert finite(None) is None
    assert finite(2) == 2.0
    group = Group("g", "G", "")
    group.add(0.0, {"a": math.nan, "b": -math.inf, "c": 1e300})
    timeline = Timeline("run", duration_s=math.nan, groups=[group])
    data = json.loads(timeline.to_json())  # allow_nan=False: it would raise
    assert data["groups"][0]["series"] == {"a": [None], "b": [None], "c": [1e300]}
    assert data["duration_s"] == 0.0


def test_a_window_never_ends_before_it_starts() -> None:
    assert Window("w", 5.0, 3.0).as_dict()["end_s"] == 5.0
    assert Window("w", 1.0, math.nan).as_dict() == {
        "label": "w", "start_s": 1.0, "end_s": 1.0, "kind": "fault",
    }  # fmt: skip


def test_table_rows_flatten_a_result() -> None:
    rows = table_rows({"lost": 0, "dead_lettered": {"poison_pill": 3}, "ids": [1], "none": {}})
    assert rows == [
        ("lost", "0"),
        ("dead lettered: poison pill", "3"),
        ("ids", "[1]"),
        ("none", "{}"),
    ]


def test_per_second_counts_commits_and_their_percentiles_per_second() -> None:
    points = [(0.2, 1.0), (0.7, 3.0), (2.1, 5.0), (-1.0, 9.0)]
    rate, latency = per_second(points, duration_s=3.5)
    assert rate.x == [0.5, 1.5, 2.5, 3.5]
    assert rate.series == {"records/s": [2.0, 0.0, 1.0, 0.0]}
    assert latency.series["p50"] == [2.0, None, 5.0, None]
    assert latency.series["p99"] == [2.98, None, 5.0, None]
    # a commit after the duration grows the axis to it
    assert len(per_second([(6.5, 1.0)], duration_s=1.0)[0].x) == 7
    assert per_second([], duration_s=0.0)[0].x == []


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([4.0], 99) == 4.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([3.0, 1.0, 2.0], 100) == 3.0
