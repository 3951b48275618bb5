"""Structured logging, configured once, with secrets redacted before anything is written.

structlog renders one JSON object per line (or a console line for people), and the
standard library's loggers (Celery, SQLAlchemy, httpx, uvicorn) are routed through the
same processors, so redaction covers third-party records too.

Redaction, in order: values under secret-looking keys become ``***``; inside every string,
URL passwords, ``Bearer`` tokens and any value registered with ``register_secret`` (the
LLM API key, at configuration) are masked.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Mapping, MutableMapping
from typing import Any, Literal

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["configure_logging", "redact", "redact_text", "register_secret"]

MASK = "***"
_SECRET_KEY = re.compile(r"pass(word|wd)?|secret|token|api[_-]?key|authorization|cookie", re.I)
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.\-]*://[^:/@\s]*:)[^@\s/]+(?=@)", re.I)
_BEARER = re.compile(r"(?P<head>\bbearer\s+)[^\s,;\"']+", re.I)
_MIN_SECRET_LENGTH = 4  # shorter "secrets" would mask ordinary words
_MAX_DEPTH = 8

_secrets: set[str] = set()
_configured = False
_configure_lock = threading.Lock()


def register_secret(value: str) -> None:
    """Mask every later occurrence of ``value`` in log output."""
    if len(value) >= _MIN_SECRET_LENGTH:
        _secrets.add(value)


def redact_text(text: str) -> str:
    text = _URL_PASSWORD.sub(rf"\g<head>{MASK}", text)
    text = _BEARER.sub(rf"\g<head>{MASK}", text)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


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


def configure_logging(
    level: str = "INFO",
    fmt: Literal["json", "console"] = "json",
    *,
    stream: Any = None,
) -> None:
    """Configure structlog and the standard library once; later calls only set the level."""
    global _configured
    with _configure_lock:
        numeric = logging.getLevelNamesMapping()[level]
        if _configured:
            logging.getLogger().setLevel(numeric)
            return
        shared: list[Processor] = [
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _stringify_exception,
            _redact_processor,
        ]
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
            cache_logger_on_first_use=True,
        )
        handler = logging.StreamHandler(stream or sys.stderr)
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
        _configured = True
