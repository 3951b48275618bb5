"""Poison pills: messages that no retry can fix, sent to the DLQ at once.

The seed's list -- JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError,
ValueError, TypeError -- plus validation errors of message bodies (pydantic's, and
Aura's ``InvalidInputError``). The detector walks the cause chain (``raise ... from``),
so a poison error wrapped by a task is still found; but an Aura error that says it is
transient (LLM, database, circuit open) is never poison, whatever built-in type it also
derives from or wraps.
"""

from __future__ import annotations

import json

import pydantic

from aura.errors import AuraError, InvalidInputError, cause_chain
from aura.logs import redact_text

__all__ = ["DEFAULT_POISON_TYPES", "PoisonPillDetector"]

DEFAULT_POISON_TYPES: tuple[type[BaseException], ...] = (
    json.JSONDecodeError,
    UnicodeDecodeError,
    AttributeError,
    KeyError,
    ValueError,
    TypeError,
    pydantic.ValidationError,
    InvalidInputError,
)
_MAX_REASON = 300


def _one_line(text: str) -> str:
    return redact_text(" ".join(text.split()))[:_MAX_REASON]


class PoisonPillDetector:
    """Tells poison from transient failures; the list of poison types is configurable."""

    def __init__(self, poison_types: tuple[type[BaseException], ...] = DEFAULT_POISON_TYPES):
        self.poison_types: tuple[type[BaseException], ...] = tuple(poison_types)

    def add(self, *types: type[BaseException]) -> None:
        self.poison_types = (*self.poison_types, *(t for t in types if t not in self.poison_types))

    def remove(self, *types: type[BaseException]) -> None:
        self.poison_types = tuple(t for t in self.poison_types if t not in types)

    def _poison_link(self, exc: BaseException) -> BaseException | None:
        for link in cause_chain(exc):
            if isinstance(link, AuraError) and link.transient:
                return None  # a transient error of ours: retry it, whatever it wraps
            if isinstance(link, self.poison_types):
                return link
        return None

    def is_poison_pill(self, exc: BaseException) -> bool:
        return self._poison_link(exc) is not None

    def get_poison_reason(self, exc: BaseException) -> str:
        """A short human-readable reason ("malformed JSON: Expecting value at line 1 ...")."""
        link = self._poison_link(exc) or exc
        if isinstance(link, json.JSONDecodeError):
            return _one_line(
                f"malformed JSON: {link.msg} at line {link.lineno} column {link.colno}"
            )
        if isinstance(link, UnicodeDecodeError):
            byte = link.object[link.start : link.start + 1].hex()
            return _one_line(
                f"invalid encoding: not {link.encoding} (byte 0x{byte} at position {link.start})"
            )
        if isinstance(link, KeyError):
            key = link.args[0] if link.args else "?"
            return _one_line(f"missing required key {key!r}")
        if isinstance(link, AttributeError):
            name = link.name or str(link)
            return _one_line(f"missing required attribute {name!r}")
        if isinstance(link, InvalidInputError | pydantic.ValidationError):
            text = str(link) if isinstance(link, InvalidInputError) else _pydantic_text(link)
            return _one_line(f"invalid message: {text}")
        if isinstance(link, TypeError):
            return _one_line(f"wrong type: {link}")
        if isinstance(link, ValueError):
            return _one_line(f"invalid value: {link}")
        return _one_line(f"{type(link).__name__}: {link}")


def _pydantic_text(exc: pydantic.ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(p) for p in error["loc"]) or "message"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
