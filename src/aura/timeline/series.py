"""A run's timeline: the series it sampled, its fault windows, its accounting, as data.

    Timeline     one run (a chaos scenario, or the demo): title, seed, passed, duration
      Group      one chart: a title, a unit, its own x (seconds since the run's start)
                 and named series on it (None where a sample failed: a gap, never a 0)
      Window     a fault window (or an instant mark, ``end_s == start_s``) with a label
      table      the accounting under the charts, as (name, value) rows

The JSON beside each report (``Timeline.as_dict``) is the page's data, exactly: what the
page draws can be checked against it. Every number in it is finite (NaN and infinities
become ``null``: JSON has neither), so any JSON reader takes it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Group", "Timeline", "Window", "finite", "table_rows"]


def finite(value: float | None) -> float | None:
    """``value`` as a float, or None for a gap (None, NaN, an infinity)."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


@dataclass(frozen=True)
class Window:
    """A fault window, in seconds since the run's start; ``kind`` "fault" (the run's
    own window: ``fault`` to ``heal``) or "mark" (one a scenario added)."""

    label: str
    start_s: float
    end_s: float
    kind: str = "fault"

    def as_dict(self) -> dict[str, Any]:
        start = finite(self.start_s) or 0.0
        end = finite(self.end_s)
        return {
            "label": self.label,
            "start_s": round(start, 3),
            "end_s": round(max(start, start if end is None else end), 3),
            "kind": self.kind,
        }


@dataclass
class Group:
    """One chart's series on their shared x; ``step``: drawn as steps (a state)."""

    name: str
    title: str
    unit: str
    x: list[float] = field(default_factory=list)
    series: dict[str, list[float | None]] = field(default_factory=dict)
    step: bool = False

    def add(self, at_s: float, values: dict[str, float | None]) -> None:
        """One sample at ``at_s``: a series new here is None before it; one missing from
        ``values`` is None at it (a gap)."""
        for name in values:
            if name not in self.series:
                self.series[name] = [None] * len(self.x)
        self.x.append(at_s)
        for name, column in self.series.items():
            column.append(finite(values.get(name)))

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "unit": self.unit,
            "step": self.step,
            "x": [round(x, 3) for x in self.x],
            "series": {
                name: [None if v is None else _round(v) for v in column]
                for name, column in self.series.items()
            },
        }


def _round(value: float) -> float:
    return round(value, 4) if abs(value) < 1e12 else value


@dataclass
class Timeline:
    """One run's report, as data (``as_dict``, ``to_json``) for ``aura.timeline.html``."""

    name: str
    summary: str = ""
    seed: int | None = None
    passed: bool = True
    duration_s: float = 0.0
    groups: list[Group] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    table: list[tuple[str, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was not sampled, and why

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "summary": self.summary,
            "seed": self.seed,
            "passed": self.passed,
            "duration_s": round(finite(self.duration_s) or 0.0, 3),
            "groups": [group.as_dict() for group in self.groups],
            "windows": [window.as_dict() for window in self.windows],
            "table": [[str(k), str(v)] for k, v in self.table],
            "failures": [str(failure) for failure in self.failures],
            "notes": [str(note) for note in self.notes],
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=1, allow_nan=False)


def table_rows(mapping: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """A result's mapping as the accounting table's rows: a nested mapping flattened
    (``dead_lettered: poison_pill``), every value as text."""
    rows: list[tuple[str, str]] = []
    for key, value in mapping.items():
        name = f"{prefix}{key}".replace("_", " ")
        if isinstance(value, dict) and value:
            rows.extend(table_rows(value, f"{prefix}{key}: "))
        else:
            rows.append((name, json.dumps(value) if isinstance(value, list | dict) else str(value)))
    return rows
