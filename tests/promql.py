"""PromQL helpers for tests that check dashboards and alert rules against aura.metrics.

    metric_names(expr)   the metric names an expression selects, as written
    known_series()       every series name aura.metrics exposes (samples and families)
    label_names(metric)  the label names a series of that name carries

No Prometheus needed: ``metric_names`` is a small tokenizer, not a full parser, and the
other two read the live ``prometheus_client.REGISTRY`` after importing ``aura.metrics``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

__all__ = ["known_series", "label_names", "metric_names"]

_TOKEN = re.compile(
    r"""
      (?P<space>\s+|\#[^\n]*)
    | (?P<string>"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'|`[^`]*`)
    | (?P<number>0[xX][0-9a-fA-F]+
        |(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*)?)
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<punct>.)
    """,
    re.VERBOSE,
)

# Keywords of the PromQL grammar: never a metric name, called or not. (Functions such as
# rate or histogram_quantile are not reserved: they are skipped because a "(" follows.)
_AGGREGATORS = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    }
)
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = (
    _AGGREGATORS
    | _GROUPING
    | frozenset({"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"})
)
_OPEN = {"(": ")", "{": "}", "[": "]"}

# Sample-name suffixes of each metric type (OpenMetrics), and the extra label they carry.
_SUFFIXES: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "counter": (("_total", ()), ("_created", ())),
    "gauge": (("", ()),),
    "histogram": (("_bucket", ("le",)), ("_count", ()), ("_sum", ()), ("_created", ())),
    "summary": (("", ("quantile",)), ("_count", ()), ("_sum", ()), ("_created", ())),
    "gaugehistogram": (("_bucket", ("le",)), ("_gcount", ()), ("_gsum", ())),
    "info": (("_info", ()),),
    "stateset": (("", ()),),
    "unknown": (("", ()),),
}


def _tokens(expr: str) -> list[tuple[str, str]]:
    """(kind, text) pairs, whitespace and comments dropped; ValueError on a broken quote."""
    tokens: list[tuple[str, str]] = []
    for match in _TOKEN.finditer(expr):
        kind = match.lastgroup
        assert kind is not None
        text = match.group()
        if kind == "space":
            continue
        if kind == "punct" and text in "\"'`":
            raise ValueError(f"unterminated string at {match.start()} in {expr!r}")
        tokens.append((kind, text))
    return tokens


def _check_balance(tokens: list[tuple[str, str]], expr: str) -> None:
    stack: list[str] = []
    for kind, text in tokens:
        if kind == "punct" and text in _OPEN:
            stack.append(_OPEN[text])
        elif kind == "punct" and text in _OPEN.values() and (not stack or stack.pop() != text):
            raise ValueError(f"unbalanced {text!r} in {expr!r}")
    if stack:
        raise ValueError(f"missing {stack[-1]!r} in {expr!r}")


def _closing(tokens: list[tuple[str, str]], start: int, expr: str) -> int:
    """Index of the bracket closing the one at ``start``."""
    stack: list[str] = []
    for index in range(start, len(tokens)):
        kind, text = tokens[index]
        if kind != "punct":
            continue
        if text in _OPEN:
            stack.append(_OPEN[text])
        elif text in _OPEN.values():
            if not stack or stack.pop() != text:
                raise ValueError(f"unbalanced {text!r} in {expr!r}")
            if not stack:
                return index
    raise ValueError(f"unclosed {tokens[start][1]!r} in {expr!r}")


def _unquote(literal: str) -> str:
    body = literal[1:-1]
    return body if literal[0] == "`" else re.sub(r"\\(.)", r"\1", body)


def _names_in_matchers(tokens: list[tuple[str, str]]) -> Iterator[str]:
    """Metric names given inside ``{...}``: ``__name__="x"`` or a bare quoted ``"x"``."""
    for index, (kind, text) in enumerate(tokens):
        before = tokens[index - 1][1] if index else "{"
        after = tokens[index + 1][1] if index + 1 < len(tokens) else "}"
        if kind == "string" and before in "{," and after in ",}":
            yield _unquote(text)
        elif (kind, text) == ("ident", "__name__"):
            following = tokens[index + 1 : index + 3]
            if [(k, t if k == "punct" else "") for k, t in following] == [
                ("punct", "="),
                ("string", ""),
            ]:
                yield _unquote(following[1][1])


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects, exactly as written (``foo_bucket`` stays so).

    Skipped: string literals, numbers and durations, ``[...]`` ranges and subqueries,
    label matchers in ``{...}`` (except a ``__name__="x"`` or quoted-name matcher), label
    lists after by/without/on/ignoring/group_left/group_right, keywords (aggregators,
    and/or/unless, bool, offset, atan2, inf, nan) and any identifier followed by "(" (a
    function call). Raises ValueError on an unterminated string or unbalanced bracket.
    """
    tokens = _tokens(expr)
    _check_balance(tokens, expr)
    names: set[str] = set()
    index = 0
    while index < len(tokens):
        kind, text = tokens[index]
        following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        if kind == "punct" and text in "{[":
            end = _closing(tokens, index, expr)
            if text == "{":
                names.update(_names_in_matchers(tokens[index + 1 : end]))
            index = end + 1
            continue
        if kind == "ident":
            word = text.lower()
            if word in _GROUPING and following == "(":
                index = _closing(tokens, index + 1, expr) + 1
                continue
            if word not in _KEYWORDS and following != "(":
                names.add(text)
        index += 1
    return names


def _project_label_names() -> dict[str, frozenset[str]]:
    """Series name -> label names, for every family of aura.metrics in the live registry."""
    import aura.metrics

    declared: dict[str, tuple[str, ...]] = {}
    for value in vars(aura.metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                declared[family.name] = tuple(getattr(value, "_labelnames", ()))

    series: dict[str, set[str]] = {}
    for family in REGISTRY.collect():
        if family.name not in declared:
            continue  # process_*, python_* and anything registered outside aura.metrics
        labels = set(declared[family.name])
        series.setdefault(family.name, set()).update(labels)
        # By type, so a labelled metric with no child yet still has its sample names.
        for suffix, extra in _SUFFIXES.get(family.type, (("", ()),)):
            series.setdefault(family.name + suffix, set()).update(labels, extra)
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in series.items()}


def known_series() -> set[str]:
    """Every sample name aura.metrics exposes (``llm_api_request_duration_seconds_bucket``,
    ``database_transaction_rollbacks_total``, ...) plus each family name, read from the live
    ``prometheus_client.REGISTRY`` (default process/platform collectors left out)."""
    return set(_project_label_names())


def label_names(metric: str) -> set[str]:
    """Label names of the series ``metric`` (a name from ``known_series()``): the metric's
    declared labels, plus ``le`` for ``_bucket``. KeyError if aura.metrics has no such name."""
    series = _project_label_names()
    if metric not in series:
        raise KeyError(f"{metric!r} is not a series of aura.metrics")
    return set(series[metric])
