"""The page: self-contained, every run-supplied text escaped, and (in Chromium) drawn."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aura.timeline import Group, IndexEntry, Timeline, Window, render, render_index, write_report
from tests.timeline.chromium import page_check


class _Page(HTMLParser):
    """The tags of a page, the text of each script, and every text node."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self.texts: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag not in ("meta", "br", "input"):
            self.stack.append(tag)
        if tag == "script":
            self.scripts.append((dict(attrs), ""))

    def handle_endtag(self, tag: str) -> None:
        assert self.stack, tag
        assert self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        if self.stack and self.stack[-1] == "script":
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)
        else:
            self.texts.append(data)


def _parsed(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    assert parser.stack == [], parser.stack  # every element closed, in order
    return parser


def _timeline(label: str, values: list[float], name: str = "net-cut") -> Timeline:
    group = Group("fates", label, label)
    for index, value in enumerate(values):
        group.add(float(index), {label: value, "committed": float(index)})
    empty = Group("queues", "Queues", "messages")
    return Timeline(
        name=name,
        summary=label,
        seed=14,
        passed=False,
        duration_s=max(len(values), 1),
        groups=[group, empty],
        windows=[Window(label, 0.5, 1.5), Window("mark", 2.0, 2.0, "mark")],
        table=[(label, label)],
        failures=[label],
        notes=[label],
    )


_NASTY = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40) | st.sampled_from(
    ["</script><script>alert(1)</script>", "\"'&<>", "]]>", "<!--", "\u2028"]
)
_VALUES = st.lists(
    st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1e308, -1e308, 0.0]),
    max_size=20,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(label=_NASTY, values=_VALUES)
def test_any_label_or_value_keeps_the_page_well_formed_and_escaped(
    label: str, values: list[float]
) -> None:
    timeline = _timeline(label, values)
    page = _parsed(render(timeline))
    assert [attrs.get("type") for attrs, _ in page.scripts] == ["application/json", None, None]
    assert page.tags.count("script") == 3
    data = json.loads(page.scripts[0][1])
    assert data == json.loads(timeline.to_json())  # the page's data is the JSON, exactly
    column = data["groups"][0]["series"].get(label, [])
    for value, got in zip(values, column, strict=False):
        assert got is None if not math.isfinite(value) else got is not None
    if label.strip():
        assert any(label in text for text in page.texts)  # shown as text, not as markup
    index = _parsed(render_index([IndexEntry(label, False, label, f"{label}.html")]))
    assert index.tags.count("script") == 0


def test_the_page_needs_no_network() -> None:
    page = render(_timeline("rate", [1.0, 2.0]))
    for loads in ("src=", "<link", "url(", "@import"):
        assert loads not in page
    # The addresses left are uPlot's banner and XML namespaces: names, never fetched.
    addresses = set(re.findall(r"https?://[^\s\"')]+", page))
    assert addresses <= {"https://github.com/leeoniya/uPlot", "http://www.w3.org/2000/svg"}
    assert "uPlot" in page
    assert len(page) < 120_000


def test_the_page_draws_every_chart_and_its_windows_in_chromium(tmp_path: Path) -> None:
    groups = [Group("rate", "Rate", "records/s"), Group("breaker", "Breaker", "", step=True)]
    for second in range(30):
        groups[0].add(second + 0.5, {"records/s": float(second % 7), "gap": None})
        groups[1].add(float(second), {"state": 2.0 if 10 <= second < 18 else 0.0})
    timeline = Timeline(
        "llm-outage", "an outage", 3, True, 30.0, groups,
        [Window("outage </script>", 10.0, 18.0), Window("kill", 22.0, 22.0, "mark")],
        [("lost", "0")],
    )  # fmt: skip
    entry = write_report(tmp_path, timeline)
    assert entry.href == "llm-outage.html"
    check = page_check(tmp_path / entry.href)
    assert check["errors"] == []
    assert check["charts"] == check["canvases"] == check["inked"] == 2
    assert check["points"] == {"rate/records/s": 30, "rate/gap": 0, "breaker/state": 30}
    drawn = [(w["label"], w["start_s"], w["end_s"]) for w in check["windows"]]
    assert [label for label, _, _ in drawn] == ["outage </script>", "kill"]
    one_px = 30.0 / 400  # the plot is at least 400 px wide
    for (_, start, end), window in zip(drawn, timeline.windows, strict=True):
        assert abs(start - window.start_s) < one_px
        assert abs(end - window.end_s) < one_px
