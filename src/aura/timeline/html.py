"""A run's timeline as one self-contained HTML page, and an index over several.

The page needs no network: uPlot (MIT, ``static/uPlot.LICENSE``), its stylesheet, the
page's own script and the data are all inlined. Every text a run supplies (names,
labels, table cells, failures) is HTML-escaped; the data travels as JSON in a
``<script type="application/json">`` whose ``<``, ``>`` and ``&`` are written as
``\\u003c``-style escapes, so no label can close the element or open another. After
drawing, the page writes what it drew (charts, inked canvases, points per series, the
fault windows in data units) into ``<pre id="aura-report-check">`` for the tests.

    DIR/<name>.html    the report           DIR/<name>.json    its data, exactly
    DIR/index.html     one row a run: passed or failed, its summary, a link to its page
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from aura.errors import InvalidInputError
from aura.timeline.series import Timeline

__all__ = [
    "IndexEntry",
    "file_stem",
    "render",
    "render_index",
    "report_directory",
    "write_index",
    "write_report",
]


@cache
def _static(name: str) -> str:
    text = resources.files("aura.timeline").joinpath("static", name).read_text("utf-8")
    if re.search(r"</(script|style)", text, re.IGNORECASE):
        raise ValueError(f"{name} would close its inline element")  # never with uPlot 1.6.32
    return text


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _script_json(data: object) -> str:
    text = json.dumps(data, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def file_stem(name: str) -> str:
    """A run's name as a file name: letters, digits, ``-`` and ``_`` only."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:80] or "run"


def _verdict(passed: bool) -> str:
    return (
        '<span class="verdict pass">passed</span>'
        if passed
        else ('<span class="verdict fail">FAILED</span>')
    )


def _head(title: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n"
        f"<style>\n{_static('uPlot.min.css')}\n{_static('report.css')}\n</style>\n</head>\n"
    )


def _rows(rows: list[tuple[str, str]]) -> str:
    return "\n".join(
        f'<tr><th scope="row">{_e(name)}</th><td class="n">{_e(value)}</td></tr>'
        for name, value in rows
    )


def _windows(timeline: Timeline) -> str:
    if not timeline.windows:
        return "<p>No fault window was recorded.</p>"
    rows = "\n".join(
        f"<tr><td>[{index}]</td><td>{_e(w.kind)}</td><td class='n'>{w.start_s:.2f}</td>"
        f"<td class='n'>{w.end_s:.2f}</td><td>{_e(w.label)}</td></tr>"
        for index, w in enumerate(timeline.windows, start=1)
    )
    return (
        "<table><thead><tr><th></th><th>kind</th><th>from s</th><th>to s</th>"
        f"<th>label</th></tr></thead>\n<tbody>\n{rows}\n</tbody></table>"
    )


def _list(items: list[str], css: str) -> str:
    if not items:
        return ""
    return f'<ul class="{css}">' + "".join(f"<li>{_e(item)}</li>" for item in items) + "</ul>"


def render(timeline: Timeline) -> str:
    """``timeline`` as one self-contained HTML page."""
    seed = "random" if timeline.seed is None else timeline.seed
    title = f"{timeline.name} ({'passed' if timeline.passed else 'FAILED'})"
    return (
        _head(f"Aura report: {title}")
        + "<body>\n<header>\n"
        + f"<h1>{_e(timeline.name)} {_verdict(timeline.passed)}</h1>\n"
        + f'<p class="summary">{_e(timeline.summary)}</p>\n'
        + f'<p class="meta">seed {_e(seed)} · {timeline.duration_s:.1f} s · '
        + f"{len(timeline.windows)} fault window(s), shaded on every chart</p>\n"
        + "</header>\n"
        + _list(timeline.failures, "failures")
        + '<main id="charts"></main>\n'
        + f"<h2>Fault windows</h2>\n{_windows(timeline)}\n"
        + f"<h2>Accounting</h2>\n<table><tbody>\n{_rows(timeline.table)}\n</tbody></table>\n"
        + _list(timeline.notes, "notes")
        + '<pre id="aura-report-check"></pre>\n'
        + '<script type="application/json" id="aura-report-data">'
        + _script_json(timeline.as_dict())
        + "</script>\n"
        + f"<script>\n{_static('uPlot.iife.min.js')}\n</script>\n"
        + f"<script>\n{_static('report.js')}\n</script>\n</body>\n</html>\n"
    )


@dataclass(frozen=True)
class IndexEntry:
    """One run on the index: ``href`` None when it has no page (it crashed early)."""

    name: str
    passed: bool
    summary: str = ""
    href: str | None = None


def render_index(entries: list[IndexEntry], title: str = "Aura run reports") -> str:
    """The index page: a row a run, passed or failed, linked to its page."""
    rows = "\n".join(
        f"<tr><td>{_link(entry)}</td><td>{_verdict(entry.passed)}</td>"
        f"<td>{_e(entry.summary)}</td></tr>"
        for entry in entries
    )
    passed = sum(entry.passed for entry in entries)
    return (
        _head(title)
        + f"<body>\n<h1>{_e(title)}</h1>\n"
        + f'<p class="meta">{passed} of {len(entries)} passed</p>\n'
        + "<table><thead><tr><th>run</th><th>result</th><th>summary</th></tr></thead>\n"
        + f"<tbody>\n{rows}\n</tbody></table>\n</body>\n</html>\n"
    )


def _link(entry: IndexEntry) -> str:
    if entry.href is None:
        return f"{_e(entry.name)} (no report)"
    return f'<a href="{_e(entry.href)}">{_e(entry.name)}</a>'


def write_report(directory: Path, timeline: Timeline) -> IndexEntry:
    """``DIR/<name>.html`` and ``DIR/<name>.json``; the run's index entry."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = file_stem(timeline.name)
    (directory / f"{stem}.json").write_text(timeline.to_json(), encoding="utf-8")
    (directory / f"{stem}.html").write_text(render(timeline), encoding="utf-8")
    return IndexEntry(timeline.name, timeline.passed, timeline.summary, f"{stem}.html")


def write_index(
    directory: Path, entries: list[IndexEntry], title: str = "Aura run reports"
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "index.html"
    path.write_text(render_index(entries, title), encoding="utf-8")
    return path


def report_directory(value: str) -> Path | None:
    """``--report DIR``'s directory, made if missing; None without one. A path that is a
    file, or that cannot be made, is an InvalidInputError naming the option."""
    if not value:
        return None
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise InvalidInputError(f"--report must be a directory; {value} is a file", field="report")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInputError(f"--report: cannot make {value}: {exc}", field="report") from exc
    return path
