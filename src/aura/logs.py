"""Structured logging, configured once, with secrets redacted before anything is written.

structlog renders one JSON object per line (or a console line for people), and the
standard library's loggers (Celery, SQLAlchemy, httpx, uvicorn) are routed through the
same processors, so redaction covers third-party records too.

Bounding, first: every string in an event (the message, each field, the rendered
``exception`` traceback) longer than ``MAX_LOG_FIELD`` characters keeps its head plus a
``…[cut N chars]`` marker; a list, tuple, set or mapping renders at most
``MAX_LOG_ITEMS`` items plus a marker, nesting stops at ``_MAX_DEPTH``, and one event
renders at most ``_MAX_LOG_NODES`` values in all (the first fields take what they need;
the rest show the marker). A cut that splits a credential
(``scheme://user:pa``, the first characters of a registered secret) masks what is left
of it, because redaction can no longer recognise it. Exceptions passed as fields are
rendered (``repr``) here, so they are bounded and redacted like strings.

Redaction, second: values under secret-looking keys become ``***``; inside every string,
URL passwords, ``Bearer`` tokens, ``password=...``-style pairs and any value registered
with ``register_secret`` (the LLM API key, at configuration) are masked. ``redact_text``
keeps the whole text (the DLQ stores whole arguments) and runs in time linear in its
length, 10 MB in well under a second whatever the text. Each pattern opens with a
literal (``://``, ``bearer``) that the regex engine finds with a fast scan, checks what
precedes it with a fixed-width lookbehind, and then repeats possessively (no
backtracking) over runs that end at a delimiter the next match must begin after, so no
character is read by more than a constant number of attempts. Lengths are not capped: a
cap would let a long password through unmasked. (The earlier ``[a-z][a-z0-9+.-]*://``
was tried at every letter and scanned to the end of the run each time: 11 s for 30,000
letters, hours for a megabyte.)
A URL password is masked when ``://`` follows a scheme character, which masks a little
more than RFC 3986 schemes (``1://u:p@h``), never less.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Mapping, MutableMapping
from itertools import islice
from typing import Any, Literal

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = [
    "MAX_LOG_FIELD",
    "MAX_LOG_ITEMS",
    "add_processor",
    "bounded_text",
    "configure_logging",
    "describe_exception",
    "logging_configured",
    "redact",
    "redact_text",
    "register_secret",
]

MASK = "***"
MAX_LOG_FIELD = 16 * 1024
"""The longest string a log event carries, in characters; longer ones are cut."""
MAX_LOG_ITEMS = 100
"""The most items a list, tuple, set or mapping in a log event renders."""

_SECRET_KEY = re.compile(r"pass(word|wd)?|secret|token|api[_-]?key|authorization|cookie", re.I)
# Group 1 is the text kept before the mask; the empty group 2 marks where the mask goes.
# The lookbehinds come after the literal so that the engine can still scan for the
# literal; no \w before "bearer" is the \b in front of it.
_URL_HEAD = r"(://(?<=[A-Za-z0-9+.\-]://)[^:/@\s]*+:)()"
_URL_PASSWORD = re.compile(_URL_HEAD + r"[^@\s/]++(?=@)")
_CUT_URL_PASSWORD = re.compile(_URL_HEAD + r"[^@\s/]++\Z")  # a cut took the "@" away
_BEARER = re.compile(r"([Bb][Ee][Aa][Rr][Ee][Rr](?<!\w......)\s++)()[^\s,;\"']++")
# "password=...", "api_key: ..." inside a text (a header name, a query string, an error)
_KEY_VALUE = re.compile(
    r"((?:pass(?:word|wd)?|secret|token|api[_-]?key)[\"']?[ \t]?[=:][ \t]?[\"']?)()"
    r"[^\s,;&\"'}\]]++",
    re.I,
)
_MIN_SECRET_LENGTH = 4  # shorter "secrets" would mask ordinary words
_MAX_DEPTH = 8
_MAX_LOG_NODES = 2000  # values per event in all: 100 per level over 8 levels is no bound

_secrets: set[str] = set()
_configured = False
_configure_lock = threading.Lock()
# The processor lists in use (structlog's own and the one for the standard library's
# records), changed in place by ``add_processor``: cached loggers hold these very lists.
_chains: list[list[Processor]] = []
_added: list[Processor] = []


def register_secret(value: str) -> None:
    """Mask every later occurrence of ``value`` in log output."""
    if len(value) >= _MIN_SECRET_LENGTH:
        _secrets.add(value)


def redact_text(text: str) -> str:
    """``text``, whole, with URL passwords, bearer tokens and registered secrets masked.

    Linear in ``len(text)`` (see the module docstring)."""
    text = _mask_after_head(_URL_PASSWORD, text)
    text = _mask_after_head(_BEARER, text)
    text = _mask_after_head(_KEY_VALUE, text)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def _mask_after_head(pattern: re.Pattern[str], text: str) -> str:
    """``text`` with what each match of ``pattern`` holds after group 2 replaced by ``MASK``."""
    # split and join, not sub(r"\1***"): Python 3.11 expands a template in Python for
    # every match, which made a text full of matches several times slower.
    pieces = pattern.split(text)  # text, head, "", text, head, "", ..., text
    if len(pieces) == 1:
        return text
    pieces[2::3] = [MASK] * (len(pieces) // 3)
    return "".join(pieces)


def bounded_text(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters and redacted; the result is at most ``limit``.

    A credential the cut splits is masked too: a URL password left without its ``@``
    (``redis://:s3cr`` becomes ``redis://:***``; a cut port looks the same and is masked
    as well) and the first characters of a registered secret at the very end."""
    limit = max(limit, 0)
    if len(text) <= limit:
        return redact_text(text)[:limit]
    return redact_text(_cut(text, limit))[:limit]


def describe_exception(exc: BaseException, limit: int = 300) -> str:
    """``"Type: message"``, cut to ``limit`` and redacted; never raises (a ``__str__``
    that raises is reported, not propagated)."""
    try:
        text = str(exc)
    except Exception:
        text = "<unprintable>"
    return bounded_text(f"{type(exc).__name__}: {text}", limit)


def _cut(text: str, limit: int) -> str:
    """The first ``limit`` characters, with any credential the cut split masked."""
    head = text[:limit]
    head = _CUT_URL_PASSWORD.sub(rf"\g<1>{MASK}", head, count=1)
    for secret in _secrets:
        for length in range(min(len(secret) - 1, len(head)), _MIN_SECRET_LENGTH - 1, -1):
            if head.endswith(secret[:length]):
                head = head[:-length] + MASK
                break
    return head


def redact(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` with secrets masked (strings, mappings, sequences)."""
    if depth > _MAX_DEPTH:
        return "<nested too deep>"
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {
            key: MASK
            if isinstance(key, str) and _SECRET_KEY.search(key)
            else redact(item, depth + 1)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(redact(item, depth + 1) for item in value)
    return value


def _bounded_field(text: str) -> str:
    if len(text) <= MAX_LOG_FIELD:
        return text
    return f"{_cut(text, MAX_LOG_FIELD)}…[cut {len(text) - MAX_LOG_FIELD} chars]"


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:  # a broken __repr__ must not break logging
        return f"<{type(value).__name__}: unprintable>"


class _Budget:
    """Values an event may still render (``_MAX_LOG_NODES`` to start)."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = _MAX_LOG_NODES


def _bound(value: Any, depth: int, budget: _Budget) -> Any:
    """A copy of ``value`` within the limits of the module docstring."""
    if isinstance(value, str):
        return _bounded_field(value)
    if isinstance(value, BaseException):
        return _bounded_field(_safe_repr(value))
    if not isinstance(value, Mapping | list | tuple | set | frozenset):
        return value
    if depth > _MAX_DEPTH:
        return "<nested too deep>"
    if isinstance(value, Mapping):
        bounded: dict[Any, Any] = {}
        for key, item in islice(value.items(), MAX_LOG_ITEMS):
            if budget.left <= 0:
                break
            budget.left -= 1
            name = _bounded_field(key) if isinstance(key, str) else key
            bounded[name] = _bound(item, depth + 1, budget)
        if len(value) > len(bounded):
            bounded["…"] = f"[cut {len(value) - len(bounded)} items]"
        return bounded
    items: list[Any] = []
    for item in islice(value, MAX_LOG_ITEMS):
        if budget.left <= 0:
            break
        budget.left -= 1
        items.append(_bound(item, depth + 1, budget))
    if len(value) > len(items):
        items.append(f"…[cut {len(value) - len(items)} items]")
    return tuple(items) if isinstance(value, tuple) else items


def _bound_processor(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    # The event's own keys are not counted or cut: structlog adds level, logger, timestamp.
    budget = _Budget()
    return {key: _bound(value, 1, budget) for key, value in event_dict.items()}


def _redact_processor(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    redacted = redact(event_dict)
    assert isinstance(redacted, MutableMapping)
    return dict(redacted)


def _stringify_exception(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    # Tracebacks can quote connection strings: render them here so they pass redaction.
    exc_info = event_dict.pop("exc_info", None)
    if exc_info:
        event_dict["exception"] = structlog.processors.format_exc_info(
            None, "", {"exc_info": exc_info}
        ).get("exception", "")
    return event_dict


def add_processor(processor: Processor) -> None:
    """Run ``processor`` on every event from now on, right after the bound context is
    merged (before bounding and redaction), whether logging is configured yet or not;
    once however often it is added (``aura.tracing``'s trace ids, when tracing is on)."""
    with _configure_lock:
        if processor in _added:
            return
        _added.append(processor)
        for chain in _chains:
            chain.insert(chain.index(structlog.contextvars.merge_contextvars) + 1, processor)


def logging_configured() -> bool:
    """Whether ``configure_logging`` has run in this process."""
    return _configured


def configure_logging(
    level: str = "INFO",
    fmt: Literal["auto", "json", "console"] = "json",
    *,
    stream: Any = None,
    cache: bool = True,
) -> None:
    """Configure structlog and the standard library once; later calls only set the level.

    ``cache=False`` keeps loggers uncached (slower): a test process whose tests capture
    logs (``structlog.testing.capture_logs``) needs it, since a cached logger keeps the
    processors it was first used with.

    ``fmt="auto"`` (LOG_FORMAT's default) writes human lines when ``stream`` (stderr) is a
    terminal and one JSON object per line otherwise."""
    global _configured
    with _configure_lock:
        numeric = logging.getLevelNamesMapping()[level]
        if _configured:
            logging.getLogger().setLevel(numeric)
            return
        shared: list[Processor] = [
            structlog.contextvars.merge_contextvars,
            *_added,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _stringify_exception,
            _bound_processor,
            _redact_processor,
        ]
        out = stream or sys.stderr
        if fmt == "auto":
            isatty = getattr(out, "isatty", None)
            fmt = "console" if callable(isatty) and isatty() else "json"
        renderer: Processor = (
            structlog.processors.JSONRenderer()
            if fmt == "json"
            else structlog.dev.ConsoleRenderer(colors=False)
        )
        structlog.configure(
            processors=[
                structlog.stdlib.filter_by_level,
                *shared,
                structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
            ],
            logger_factory=structlog.stdlib.LoggerFactory(),
            wrapper_class=structlog.stdlib.BoundLogger,
            cache_logger_on_first_use=cache,
        )
        _chains[:] = [structlog.get_config()["processors"], shared]
        handler = logging.StreamHandler(out)
        handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=shared,
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    renderer,
                ],
            )
        )
        root = logging.getLogger()
        root.handlers = [handler]
        root.setLevel(numeric)
        # Alembic announces each of its plugins at INFO when first imported, which the
        # CLI now does after logging is set up (commands import what they need lazily).
        logging.getLogger("alembic.runtime.plugins").setLevel(max(numeric, logging.WARNING))
        _configured = True
