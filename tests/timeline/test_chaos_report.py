"""A real chaos scenario with ``--report``: its page, drawn in headless Chromium, shows
every chart inked, every series sampled, and the fault windows where the run put them.

commit-cut (a connection cut between a COMMIT and its reply, five times, each a mark on the
timeline) is the suite's run of a scenario: its fates are checked here as
``tests/chaos/test_chaos.py`` checks every scenario's, about 16 s on this suite's servers."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.test_chaos import SCALED, assert_met_its_fates
from tests.cli.test_cli import run_aura
from tests.timeline.chromium import page_check

_NAME = "commit-cut"
_PRODUCTS = SCALED[_NAME]
_CUTS = 5


@pytest.mark.timeout(200)
def test_a_chaos_run_writes_a_report_that_draws_what_the_run_sampled(
    pg_url: str, amqp_url: str, tmp_path: Path
) -> None:
    env = {"DATABASE_URL": pg_url, "CELERY_BROKER_URL": amqp_url}
    reports = tmp_path / "reports"
    done = run_aura(
        "chaos", _NAME, "--products", str(_PRODUCTS), "--seed", "14", "--json",
        "--report", str(reports), env=env, cwd=tmp_path, timeout=190,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["passed"], result
    assert_met_its_fates(_NAME, result, _PRODUCTS, str(result))  # as test_chaos.py would
    data: dict[str, Any] = json.loads((reports / f"{_NAME}.json").read_text())
    assert (data["name"], data["seed"], data["passed"]) == (_NAME, 14, True)
    _assert_series(data, result)
    fault, *marks = _assert_windows(data, result)

    check = page_check(reports / f"{_NAME}.html")
    assert check["errors"] == []
    assert check["charts"] == check["canvases"] == check["inked"] == len(data["groups"])
    for group in data["groups"]:
        for name, column in group["series"].items():
            assert check["points"][f"{group['name']}/{name}"] == sum(v is not None for v in column)
    drawn = {w["label"]: w for w in check["windows"]}
    one_px = data["duration_s"] / 400  # the plot is at least 400 px wide
    for window in [fault, *marks]:
        on_page = drawn[window["label"]]
        assert abs(on_page["start_s"] - window["start_s"]) < one_px
        assert abs(on_page["end_s"] - window["end_s"]) < one_px
        assert on_page["width_px"] >= 0

    index = (reports / "index.html").read_text()
    assert f'<a href="{_NAME}.html">{_NAME}</a>' in index
    assert "1 of 1 passed" in index


def _assert_series(data: dict[str, Any], result: dict[str, Any]) -> None:
    """Every chart is there and every series has points; the records' own agree with the
    accounting exactly (they come from the database's timestamps)."""
    groups = {group["name"]: group for group in data["groups"]}
    assert list(groups) == ["rate", "latency", "fates", "breaker", "queues"]
    for group in groups.values():
        assert group["x"], group["name"]
        for name, column in group["series"].items():
            assert any(v is not None for v in column), (group["name"], name)
    assert sum(groups["rate"]["series"]["records/s"]) == _PRODUCTS
    p99 = [v for v in groups["latency"]["series"]["p99"] if v is not None]
    assert 0 < max(p99) <= data["duration_s"]
    fates = groups["fates"]["series"]
    # each record ingested, then enriched; a cut COMMIT's retry is a duplicate delivery,
    # not a second success
    assert fates["committed"][-1] >= 2 * _PRODUCTS - _CUTS
    assert {"realtime_queue", "bulk_queue"} & set(groups["queues"]["series"])
    # sampled once a second (the metrics), over the whole run
    x = groups["fates"]["x"]
    assert x[0] < 1.0
    assert data["duration_s"] - x[-1] < 2.0
    assert max(b - a for a, b in itertools.pairwise(x)) < 1.6


def _assert_windows(data: dict[str, Any], result: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's fault window (from its start to the heal) and the scenario's own marks
    inside it: one instant per COMMIT reply cut, in order."""
    faults = [w for w in data["windows"] if w["kind"] == "fault"]
    marks = [w for w in data["windows"] if w["kind"] == "mark"]
    assert len(faults) == 1, data["windows"]
    assert [m["label"] for m in marks] == [
        f"COMMIT reply cut ({n} of {_CUTS})" for n in range(1, _CUTS + 1)
    ]
    fault = faults[0]
    assert fault["label"].startswith(f"{_NAME}: ")
    for mark in marks:
        assert fault["start_s"] <= mark["start_s"] == mark["end_s"] <= fault["end_s"]
    assert [m["start_s"] for m in marks] == sorted(m["start_s"] for m in marks)
    assert result["details"]["commit_replies_cut"] == _CUTS
    assert fault["start_s"] > 0
    assert fault["end_s"] <= data["duration_s"]
    # the drain opened the window once the worker consumed; the run says when
    assert fault["start_s"] >= result["details"]["fault_started_after_s"] - 0.1
    return [fault, *marks]
