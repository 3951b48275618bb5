"""JSON a product row can hold: what PostgreSQL would refuse, refused before any write.

``load_json(text)`` parses one JSON text and ``storable_problems(value)`` names, by dotted
path, every value the database (or a JSON parser elsewhere in the pipeline) would refuse:

    a NUL character (``\\u0000``)         PostgreSQL ``text`` and ``jsonb`` cannot hold it
    NaN, Infinity, -Infinity             not JSON (RFC 8259); ``json``/``jsonb`` refuse them
    a number beyond a double (1e400)     Python reads it as infinity and writes ``Infinity``
    a lone UTF-16 surrogate (\\udcff)     cannot be encoded as UTF-8 (optional, see below)
    nesting deeper than MAX_JSON_DEPTH    bounded before anything recurses over it

The walk is iterative and linear in the size of the value; ``json.loads`` itself stops at
Python's recursion limit (``RecursionError``), which ``load_json`` reports as too deep.
Lone surrogates are optional because PostgreSQL's ``json`` type stores them: an import
record carrying one is the worker's poison pill (it reaches a ``text`` column there), a
product body carrying one would fail the gateway's own INSERT.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from aura.errors import InvalidInputError

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_REPORTED_PROBLEMS",
    "JSONTooDeepError",
    "load_json",
    "show_key",
    "storable_problems",
]

MAX_JSON_DEPTH = 32
MAX_REPORTED_PROBLEMS = 20
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,40}")


class JSONTooDeepError(InvalidInputError):
    """The text nests past Python's recursion limit: too deep to parse at all."""


class _NonFinite:
    """What ``NaN``/``Infinity``/``-Infinity`` parse to, so the walk can name the literal."""

    __slots__ = ("literal",)

    def __init__(self, literal: str) -> None:
        self.literal = literal


def load_json(text: str | bytes, *, field: str = "body") -> Any:
    """Parse one JSON text; ``InvalidInputError`` naming ``field`` if it is not JSON or
    is nested past Python's recursion limit. Non-finite literals parse to a marker that
    ``storable_problems`` reports."""
    try:
        return json.loads(text, parse_constant=_NonFinite)
    except RecursionError:
        raise JSONTooDeepError(
            f"{field}: nested deeper than {MAX_JSON_DEPTH} levels", field=field
        ) from None
    except (UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise InvalidInputError(f"{field}: not valid JSON ({reason})", field=field) from exc


def show_key(part: str | int) -> str:
    """A path element as it can be shown on one line (keys come from the input)."""
    text = str(part)
    if not _PLAIN_KEY.fullmatch(text):
        text = repr(text[:40])
    return text


def _join(prefix: str, part: str | int) -> str:
    shown = show_key(part)
    return f"{prefix}.{shown}" if prefix else shown


def _text_problem(text: str, *, surrogates: bool) -> str | None:
    if "\x00" in text:
        return "contains a NUL character (\\u0000), which PostgreSQL cannot store"
    if not surrogates:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "contains a lone UTF-16 surrogate, which is not valid Unicode text"
    return None


def storable_problems(
    value: Any, *, prefix: str = "", allow_surrogates: bool = False
) -> list[tuple[str, str]]:
    """(dotted path, what is wrong) for each value PostgreSQL would refuse; at most
    MAX_REPORTED_PROBLEMS. The path of the value itself is ``prefix`` (or ``body``)."""
    problems: list[tuple[str, str]] = []
    stack: list[tuple[str, Any, int]] = [(prefix, value, 0)]
    while stack and len(problems) < MAX_REPORTED_PROBLEMS:
        path, item, depth = stack.pop()
        where = path or "body"
        if isinstance(item, str):
            problem = _text_problem(item, surrogates=allow_surrogates)
            if problem:
                problems.append((where, problem))
        elif isinstance(item, _NonFinite):
            problems.append((where, f"{item.literal} is not a JSON number; send a finite one"))
        elif isinstance(item, float) and not math.isfinite(item):
            problems.append((where, "number is too large (beyond a 64-bit float)"))
        elif isinstance(item, dict | list):
            if depth >= MAX_JSON_DEPTH:  # named at the top: the deep path is no help
                problems.append((prefix or "body", f"nested deeper than {MAX_JSON_DEPTH} levels"))
                break
            children: list[tuple[str, Any, int]] = []
            if isinstance(item, dict):
                for key, child in item.items():
                    key_problem = _text_problem(key, surrogates=allow_surrogates)
                    if key_problem:
                        problems.append((_join(path, key), f"key {key_problem}"))
                    children.append((_join(path, key), child, depth + 1))
            else:
                children = [(_join(path, i), child, depth + 1) for i, child in enumerate(item)]
            stack.extend(reversed(children))  # reported in document order
    return problems[:MAX_REPORTED_PROBLEMS]
