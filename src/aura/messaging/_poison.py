"""Poison pills: messages that no retry can fix, sent to the DLQ at once.

Poison: the seed's list -- JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError,
ValueError, TypeError -- plus RecursionError (a JSON body nested too deep), validation
errors of message bodies (pydantic's, and Aura's ``InvalidInputError``), and a database
that refuses the data itself. The list of types is configurable; the other rules are not.

The detector walks the cause chain outwards in (``raise ... from``, else the context;
at most ten links, loops cut) and the first link that decides wins:

    a transient Aura error (LLM, database, circuit open)   not poison, whatever it wraps
    a SQLSTATE on the link, or on its ``.orig``             the table below decides
    an exception group                                      its members decide
    raised inside a transport library (see below)          not poison
    an instance of a poison type                            poison
    anything else                                           ask the next link

SQLSTATE, read as ``sqlstate`` (asyncpg) or ``pgcode`` (SQLAlchemy's asyncpg adapter,
reached from ``DBAPIError.orig``). It comes before the transport rule because SQLAlchemy
raises a driver's data error from ``sqlalchemy.engine``:

    class 22  data exception: 22021 bad byte (NUL), 22P02 bad text     poison
              representation (NaN in json), 22003 out of range, 22001
              too long, ...
    23502     not_null_violation                                      poison
    23514     check_violation                                         poison
    class 54  program limit exceeded (54000: row too big)             poison
    23505     unique_violation          (a race: the retry may pass)  not poison
    23503     foreign_key_violation     (a race: the parent may come)  not poison
    class 08  connection exception                                    not poison
    class 40  serialization failure, deadlock                         not poison
    class 53  insufficient resources                                  not poison
    class 57  operator intervention (admin shutdown, query canceled)  not poison
    55P03     lock_not_available                                      not poison
    any other no decision: ask the next link

Transport libraries: a link whose traceback ends (innermost frame) in a module of
amqp, kombu, redis, asyncpg, httpx, httpcore, anyio, aiohttp, ssl, socket, asyncio,
sqlalchemy.pool or sqlalchemy.engine is not poison, whatever its type. A ValueError
raised there is the library's trouble, not the message's: py-amqp raised
``ValueError('not enough values to unpack (expected 3, got 0)')`` reading frames from a
closed connection during a publish, and that message was dead-lettered as a poison pill.
The failure we accept: a library that rejects bad data from the message with a
ValueError now costs the message its retries before the DLQ, instead of none.

Exception groups: poison only when every member is poison (a transient member means a
retry may help); the reason names the first member. Members are judged by these same
rules, nested groups included, within a budget of links examined; a group too big or
too deep to judge in it is not poison (retries, then the DLQ, settle it).

The detector runs on the failure path, so it never raises and is bounded: ``str()`` of
an exception can raise or be ten megabytes; every text is cut with
``aura.logs.bounded_text`` and a reason is one line of at most 300 characters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import TracebackType

import pydantic

from aura.errors import AuraError, InvalidInputError
from aura.logs import bounded_text

__all__ = ["DEFAULT_POISON_TYPES", "PoisonPillDetector"]

DEFAULT_POISON_TYPES: tuple[type[BaseException], ...] = (
    json.JSONDecodeError,
    UnicodeDecodeError,
    AttributeError,
    KeyError,
    ValueError,
    TypeError,
    RecursionError,
    pydantic.ValidationError,
    InvalidInputError,
)
_MAX_REASON = 300
_MAX_CHAIN = 10  # links per cause chain, as aura.errors.cause_chain
_MAX_ORIG = 4  # hops along .orig (DBAPIError -> adapter error -> driver error)
_MAX_LINKS = 256  # links examined per judgement, over all chains and group members
_MAX_GROUP_DEPTH = 4

_POISON_SQLSTATES = frozenset({"23502", "23514"})
_POISON_SQLSTATE_CLASSES = frozenset({"22", "54"})
_TRANSIENT_SQLSTATES = frozenset({"23505", "23503", "55P03"})
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57"})
_TRANSPORT_PACKAGES = (
    "amqp",
    "kombu",
    "redis",
    "asyncpg",
    "httpx",
    "httpcore",
    "anyio",
    "aiohttp",
    "ssl",
    "socket",
    "asyncio",
    "sqlalchemy.pool",
    "sqlalchemy.engine",
)


@dataclass(frozen=True)
class _Poison:
    """What made a failure poison: ``link``, and the SQLSTATE when the database said so."""

    link: BaseException
    sqlstate: str | None = None
    group_size: int = 0  # members of the outermost exception group it was found in


class _Budget:
    """Links a judgement may still examine; when none are left, nothing more is poison."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = _MAX_LINKS


class PoisonPillDetector:
    """Tells poison from transient failures; the list of poison types is configurable."""

    def __init__(self, poison_types: tuple[type[BaseException], ...] = DEFAULT_POISON_TYPES):
        self.poison_types: tuple[type[BaseException], ...] = tuple(poison_types)

    def add(self, *types: type[BaseException]) -> None:
        self.poison_types = (*self.poison_types, *(t for t in types if t not in self.poison_types))

    def remove(self, *types: type[BaseException]) -> None:
        self.poison_types = tuple(t for t in self.poison_types if t not in types)

    def is_poison_pill(self, exc: BaseException) -> bool:
        """True when no retry can help; never raises."""
        return self._judge(exc) is not None

    def get_poison_reason(self, exc: BaseException) -> str:
        """A short human-readable reason ("malformed JSON: Expecting value at line 1 ...").

        One line, at most 300 characters, secrets masked; never raises."""
        poison = self._judge(exc) or _Poison(exc)  # not poison: described all the same
        try:
            reason = _describe(poison)
            if poison.group_size:
                reason = f"all {poison.group_size} errors of a group are poison; first: {reason}"
            return _one_line(reason)
        except Exception:  # a hostile exception must not break the failure path
            return _one_line(f"{type(exc).__name__}: <unprintable>")

    def _judge(self, exc: BaseException) -> _Poison | None:
        try:
            return self._judge_chain(exc, _Budget(), depth=0)
        except Exception:  # the detector must not fail the failure path; retry instead
            return None

    def _judge_chain(self, exc: BaseException, budget: _Budget, depth: int) -> _Poison | None:
        for link in _links(exc, budget):
            if isinstance(link, AuraError) and _is_transient(link):
                return None  # a transient error of ours: retry it, whatever it wraps
            sqlstate, carrier = _sqlstate(link)
            if sqlstate is not None:
                verdict = _sqlstate_verdict(sqlstate)
                if verdict is not None:
                    return _Poison(carrier, sqlstate) if verdict else None
            if isinstance(link, BaseExceptionGroup):
                return self._judge_group(link, budget, depth)
            if _raised_in_transport(link.__traceback__):
                return None  # the library's trouble, not the message's
            if isinstance(link, self.poison_types):
                return _Poison(link)
        return None

    def _judge_group(
        self, group: BaseExceptionGroup[BaseException], budget: _Budget, depth: int
    ) -> _Poison | None:
        members = group.exceptions
        if not members or depth >= _MAX_GROUP_DEPTH or len(members) > budget.left:
            return None
        first: _Poison | None = None
        for member in members:
            found = self._judge_chain(member, budget, depth + 1)
            if found is None:
                return None  # a member a retry may fix: retry the whole
            if first is None:
                first = found
        assert first is not None  # members is not empty
        return _Poison(first.link, first.sqlstate, len(members))


def _links(exc: BaseException, budget: _Budget) -> list[BaseException]:
    """``exc`` and what it was raised from, like ``aura.errors.cause_chain`` but by
    identity and without truthiness (``__eq__`` and ``__bool__`` can raise), and within
    the budget."""
    links: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(links) < _MAX_CHAIN:
        if budget.left <= 0:
            break
        budget.left -= 1
        links.append(current)
        seen.add(id(current))
        cause = current.__cause__
        current = cause if cause is not None else current.__context__
    return links


def _sqlstate(link: BaseException) -> tuple[str | None, BaseException]:
    """The SQLSTATE ``link`` carries, itself or along ``.orig``, and the innermost
    exception carrying it (the driver's own, whose text is the server's message)."""
    found: tuple[str | None, BaseException] = (None, link)
    current: object = link
    for _ in range(_MAX_ORIG):
        if not isinstance(current, BaseException):
            break
        for name in ("sqlstate", "pgcode"):
            code = _attribute(current, name)
            if isinstance(code, str) and len(code) == 5 and code.isalnum():
                found = (code.upper(), current)
                break
        current = _attribute(current, "orig")
    return found


def _sqlstate_verdict(code: str) -> bool | None:
    """True: poison; False: transient; None: the SQLSTATE does not decide."""
    if code in _POISON_SQLSTATES or code[:2] in _POISON_SQLSTATE_CLASSES:
        return True
    if code in _TRANSIENT_SQLSTATES or code[:2] in _TRANSIENT_SQLSTATE_CLASSES:
        return False
    return None


def _raised_in_transport(traceback: TracebackType | None) -> bool:
    """True when the innermost frame of ``traceback`` runs a transport library's code."""
    if traceback is None:
        return False
    while traceback.tb_next is not None:  # tracebacks are finite and cannot loop
        traceback = traceback.tb_next
    module = traceback.tb_frame.f_globals.get("__name__")
    if not isinstance(module, str):
        return False
    return any(module == p or module.startswith(f"{p}.") for p in _TRANSPORT_PACKAGES)


def _is_transient(error: AuraError) -> bool:
    try:
        return bool(error.transient)
    except Exception:  # a property that raises says nothing; the rest of the chain decides
        return False


def _attribute(obj: object, name: str) -> object:
    try:
        return getattr(obj, name, None)
    except Exception:  # a property that raises
        return None


def _safe_str(obj: object) -> str:
    try:
        return str(obj)
    except Exception:  # a __str__ that raises, or returns no string
        return f"<unprintable {type(obj).__name__}>"


def _safe_repr(obj: object) -> str:
    try:
        return repr(obj)
    except Exception:  # a __repr__ that raises, or nests too deep
        return f"<unprintable {type(obj).__name__}>"


def _one_line(text: str) -> str:
    # Cut before splitting: str() of an exception can be megabytes.
    window = bounded_text(text, 4 * _MAX_REASON)
    return bounded_text(" ".join(window.split()), _MAX_REASON)


def _first_line(text: str) -> str:
    lines = text[: 4 * _MAX_REASON].strip().splitlines()
    return lines[0] if lines else ""


def _describe(poison: _Poison) -> str:
    link = poison.link
    if poison.sqlstate is not None:
        message = _first_line(_safe_str(link))
        return f"the database refused the data (SQLSTATE {poison.sqlstate}): {message}"
    if isinstance(link, json.JSONDecodeError):
        return f"malformed JSON: {link.msg} at line {link.lineno} column {link.colno}"
    if isinstance(link, UnicodeDecodeError):
        byte = link.object[link.start : link.start + 1].hex()
        return f"invalid encoding: not {link.encoding} (byte 0x{byte} at position {link.start})"
    if isinstance(link, KeyError):
        key = _safe_repr(link.args[0]) if link.args else "'?'"
        return f"missing required key {key}"
    if isinstance(link, AttributeError):
        name = link.name if isinstance(link.name, str) and link.name else _safe_str(link)
        return f"missing required attribute {name!r}"
    if isinstance(link, InvalidInputError):
        return f"invalid message: {_safe_str(link)}"
    if isinstance(link, pydantic.ValidationError):
        return f"invalid message: {_pydantic_text(link)}"
    if isinstance(link, RecursionError):
        return f"nested too deep: {_safe_str(link)}"
    if isinstance(link, TypeError):
        return f"wrong type: {_safe_str(link)}"
    if isinstance(link, ValueError):
        return f"invalid value: {_safe_str(link)}"
    return f"{type(link).__name__}: {_safe_str(link)}"


def _pydantic_text(exc: pydantic.ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False)[:10]:
        where = ".".join(str(p) for p in error["loc"]) or "message"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
