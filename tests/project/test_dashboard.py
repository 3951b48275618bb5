"""deploy/grafana/aura.json: importable, one row per seed layer, every query over real metrics.

The metric names come from the live prometheus_client registry (via tests.promql), so a
metric added to aura.metrics must show up on the dashboard, and a renamed one breaks it.
"""

from __future__ import annotations

import json
import re
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from aura.metrics import CIRCUIT_STATE_VALUES
from tests.promql import known_series, label_names, metric_names

DASHBOARD_PATH = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "aura.json"
ROWS = ("Database", "LLM", "Message processing")
DATASOURCE_VARIABLE = "datasource"
GRID_COLUMNS = 24

Panel = dict[str, Any]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD_PATH.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def all_panels(dashboard: dict[str, Any]) -> list[Panel]:
    """Top-level panels, and those inside collapsed rows."""
    panels: list[Panel] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def data_panels(dashboard: dict[str, Any]) -> list[Panel]:
    return [panel for panel in all_panels(dashboard) if panel["type"] != "row"]


def expressions(panel: Panel) -> list[str]:
    return [str(target.get("expr", "")) for target in panel.get("targets", [])]


def referenced_names(dashboard: dict[str, Any]) -> set[str]:
    return {
        name
        for panel in data_panels(dashboard)
        for expr in expressions(panel)
        for name in metric_names(expr)
    }


def panels_by_row(dashboard: dict[str, Any]) -> dict[str, list[Panel]]:
    """Each row's panels: nested ones if collapsed, else those below it up to the next row."""
    rows: dict[str, list[Panel]] = {}
    current: list[Panel] | None = None
    for panel in sorted(dashboard["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
        if panel["type"] == "row":
            current = rows.setdefault(panel["title"], list(panel.get("panels", [])))
        else:
            assert current is not None, f"panel {panel['title']!r} sits above the first row"
            current.append(panel)
    return rows


# The dashboard itself


def test_dashboard_is_importable(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "aura-resilience"
    assert dashboard["title"] == "Aura resilience"
    assert dashboard["schemaVersion"] == 39
    assert dashboard["time"] == {"from": "now-1h", "to": "now"}
    assert dashboard["refresh"] == "30s"
    assert dashboard.get("id") is None, "an exported id would clash on import"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables[DATASOURCE_VARIABLE]["type"] == "datasource"
    assert variables[DATASOURCE_VARIABLE]["query"] == "prometheus"


def test_one_row_per_seed_layer_in_order(dashboard: dict[str, Any]) -> None:
    rows = [panel for panel in dashboard["panels"] if panel["type"] == "row"]
    assert [row["title"] for row in rows] == list(ROWS)
    assert [row["gridPos"]["y"] for row in rows] == sorted(row["gridPos"]["y"] for row in rows)
    for title, panels in panels_by_row(dashboard).items():
        assert panels, f"row {title!r} has no panels"


def test_each_layers_metrics_sit_in_its_row(dashboard: dict[str, Any]) -> None:
    prefixes = {
        "Database": ("database_", "sqlalchemy_", "aura_dependency_"),
        "LLM": ("llm_", "aura_llm_"),
        "Message processing": (
            "messages_",
            "celery_",
            "aura_task_",
            "aura_duplicate_",
            "aura_dlq_",
            "aura_broker_",
            "aura_outbox_",
        ),
    }
    for title, panels in panels_by_row(dashboard).items():
        for panel in panels:
            for expr in expressions(panel):
                misplaced = {n for n in metric_names(expr) if not n.startswith(prefixes[title])}
                assert not misplaced, f"{panel['title']!r} in row {title!r} queries {misplaced}"


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in all_panels(dashboard)]
    assert all(isinstance(panel_id, int) for panel_id in ids), ids
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"


def test_every_query_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    reference = f"${{{DATASOURCE_VARIABLE}}}"
    for panel in data_panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": reference}, panel["title"]
        assert panel.get("targets"), f"{panel['title']!r} has no queries"
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"]) == panel["datasource"]


def test_panels_have_units_and_known_types(dashboard: dict[str, Any]) -> None:
    for panel in data_panels(dashboard):
        assert panel["type"] in {"timeseries", "stat"}, panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']!r} has no unit"


def test_every_expression_queries_only_known_series(dashboard: dict[str, Any]) -> None:
    known = known_series()
    unknown: dict[str, set[str]] = {}
    for panel in data_panels(dashboard):
        for expr in expressions(panel):
            assert expr.strip(), f"{panel['title']!r} has an empty query"
            names = metric_names(expr)
            assert names, f"{panel['title']!r}: {expr!r} selects no metric"
            if names - known:
                unknown.setdefault(panel["title"], set()).update(names - known)
    assert not unknown, f"series not exposed by aura.metrics, per panel: {unknown}"


def test_every_grouping_label_exists(dashboard: dict[str, Any]) -> None:
    """Labels in by (...) and in legends {{...}} are labels of the series queried."""
    for panel in data_panels(dashboard):
        for target in panel["targets"]:
            expr = target["expr"]
            available = set().union(*(label_names(name) for name in metric_names(expr)))
            used = {
                label.strip()
                for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
                for label in group.split(",")
                if label.strip()
            }
            used |= set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            assert used <= available, f"{panel['title']!r}: no labels {used - available}"


def test_every_project_metric_is_on_the_dashboard(dashboard: dict[str, Any]) -> None:
    """Each family of aura.metrics (read from the registry) has a sample on some panel."""
    referenced = referenced_names(dashboard)
    known = known_series()
    families = {family.name for family in REGISTRY.collect() if family.name in known}
    assert families
    missing = {
        family
        for family in families
        if not any(name == family or name.startswith(family + "_") for name in referenced)
    }
    assert not missing, f"metrics of aura.metrics on no panel: {sorted(missing)}"


def test_breaker_state_panel_maps_every_state(dashboard: dict[str, Any]) -> None:
    [panel] = [
        p
        for p in data_panels(dashboard)
        if any("llm_circuit_breaker_state" in metric_names(e) for e in expressions(p))
    ]
    options: dict[str, dict[str, Any]] = {}
    for mapping in panel["fieldConfig"]["defaults"]["mappings"]:
        if mapping["type"] == "value":
            options.update(mapping["options"])
    expected = {str(v): state.value.replace("_", "-") for state, v in CIRCUIT_STATE_VALUES.items()}
    assert {value: option["text"] for value, option in options.items()} == expected


def test_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    placed = list(dashboard["panels"])  # a collapsed row's nested panels are not laid out
    for panel in placed:
        grid = panel["gridPos"]
        assert grid["w"] > 0, panel["title"]
        assert grid["h"] > 0, panel["title"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= GRID_COLUMNS, panel["title"]
        assert grid["y"] >= 0, panel["title"]
    for first, second in combinations(placed, 2):
        a, b = first["gridPos"], second["gridPos"]
        apart = (
            a["x"] + a["w"] <= b["x"]
            or b["x"] + b["w"] <= a["x"]
            or a["y"] + a["h"] <= b["y"]
            or b["y"] + b["h"] <= a["y"]
        )
        assert apart, f"{first['title']!r} overlaps {second['title']!r}"


# The PromQL helper


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        (
            "histogram_quantile(0.99, sum by (le, outcome) "
            "(rate(llm_api_request_duration_seconds_bucket[5m])))",
            {"llm_api_request_duration_seconds_bucket"},
        ),
        (
            'sum(increase(messages_sent_to_dlq_total{reason="poison_pill"}[5m])) > 0',
            {"messages_sent_to_dlq_total"},
        ),
        (
            'label_replace(celery_tasks_pending, "copy", "messages_sent_to_dlq_total", '
            '"queue", "(.*)")',
            {"celery_tasks_pending"},
        ),
        (
            "sum without (instance) (rate(a_total[5m] offset 1h)) / on (job) group_left (team) "
            "max(b) > bool 1e3 and count(c) unless topk(3, d) or clamp_min(abs(e), 0)",
            {"a_total", "b", "c", "d", "e"},
        ),
        (
            '{__name__="job:requests:rate5m", job="x"} or vector(1) * time()',
            {"job:requests:rate5m"},
        ),
        ("deriv(f[10m:1m]) - delta(g[1h30m]) + irate(h[5m]) * scalar(i)", {"f", "g", "h", "i"}),
        ("sum(rate(j_total[5m])) # the rollback rate k_total", {"j_total"}),
        ("", set()),
    ],
)
def test_metric_names(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected


@pytest.mark.parametrize("expr", ["sum(rate(x[5m])", "x)", 'x{a="1"', 'x{a="1}', "x[5m)]"])
def test_metric_names_rejects_broken_expressions(expr: str) -> None:
    with pytest.raises(ValueError, match=r"unbalanced|missing|unterminated"):
        metric_names(expr)


def test_known_series_come_from_the_registry() -> None:
    known = known_series()
    assert {
        "database_transaction_rollbacks_total",
        "sqlalchemy_pool_connections_active",
        "llm_api_request_duration_seconds_bucket",
        "llm_api_request_duration_seconds_count",
        "llm_circuit_breaker_state",
    } <= known
    assert not {name for name in known if name.startswith(("process_", "python_"))}


def test_label_names() -> None:
    assert label_names("database_transaction_rollbacks_total") == {"reason"}
    assert label_names("llm_api_request_duration_seconds_bucket") == {"le", "outcome"}
    assert label_names("llm_api_request_duration_seconds_count") == {"outcome"}
    assert label_names("llm_circuit_breaker_state") == {"breaker"}
    with pytest.raises(KeyError):
        label_names("no_such_metric_total")
