"""The commands that need an extra, and the one line they print when it is not installed.

``pip install aura-platform`` is the core; the platform's commands need an extra
(pyproject's ``optional-dependencies``). Each such command says which in ``--help``
("(needs aura-platform[gateway])") and, before it does anything, looks its extra's modules
up with ``importlib.util.find_spec`` (no import: a few path lookups). One missing is one
line naming the extra to install, exit 2, never a ``ModuleNotFoundError`` traceback.

A command that needs an extra only on a path it cannot know at its start (the embedded
defaults: ``DATABASE_URL`` unset is SQLite through aiosqlite, ``REDIS_URL`` unset an
in-process stand-in from fakeredis) is caught on the way out instead: ``missing_extra``
turns a ``ModuleNotFoundError`` of an extra's module into the same line.

``EXTRAS`` is a copy of pyproject's lists under their import names, so that building the
help reads no package metadata (``tests/cli/test_cli_install.py`` checks it against
pyproject). uvloop is left out: it is installed only on some platforms, and without it
asyncio's loop serves.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from aura.errors import ConfigurationError, cause_chain

__all__ = ["EXTRAS", "missing_extra", "needs_extra", "require_extra", "with_extra"]

_GATEWAY = ("fastapi", "uvicorn", "aio_pika", "httptools")
EXTRAS: dict[str, tuple[str, ...]] = {
    "gateway": _GATEWAY,
    "demo": (*_GATEWAY, "aiosqlite", "fakeredis"),
    "chaos": _GATEWAY,
}
# The setting whose embedded default needs a module (the way out besides the extra).
_EMBEDDED = {"aiosqlite": "DATABASE_URL", "fakeredis": "REDIS_URL"}

_Command = TypeVar("_Command", bound=Callable[..., Any])


def _install(extra: str) -> str:
    return f"pip install 'aura-platform[{extra}]'"


def with_extra(help_text: str, extra: str) -> str:
    """``help_text`` with "(needs aura-platform[EXTRA])" closing its first paragraph, the
    part the command list shows (the bracket escaped: the help is Rich markup)."""
    first, sep, rest = inspect.cleandoc(help_text).partition("\n\n")
    return f"{first} (needs aura-platform\\[{extra}]){sep}{rest}"


def _installed(module: str) -> bool:
    from importlib.util import find_spec

    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):  # a finder that refuses it, a broken half-install
        return False


def require_extra(extra: str) -> None:
    """Raise ``ConfigurationError`` (one line, exit 2) if a module of ``extra`` is missing."""
    missing = [module for module in EXTRAS[extra] if not _installed(module)]
    if missing:
        raise ConfigurationError(
            f"this command needs aura-platform[{extra}], not installed here "
            f"(no {', '.join(missing)}): {_install(extra)}"
        )


def needs_extra(extra: str) -> Callable[[_Command], _Command]:
    """Mark a command as needing ``extra``: its help says so, its start checks it. Put it
    under ``@app.command``."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}")

    def mark(command: _Command) -> _Command:
        @functools.wraps(command)
        def checked(*args: Any, **kwargs: Any) -> Any:
            require_extra(extra)
            return command(*args, **kwargs)

        checked.__doc__ = with_extra(command.__doc__ or "", extra)
        return checked  # type: ignore[return-value]

    return mark


def missing_extra(exc: BaseException) -> str | None:
    """The one line for a ``ModuleNotFoundError`` of an extra's module in ``exc``'s chain,
    or None (any other missing module is a bug and keeps its traceback)."""
    for link in cause_chain(exc):
        if not isinstance(link, ModuleNotFoundError) or not link.name:
            continue
        module = link.name.split(".")[0]
        extra = next((name for name, modules in EXTRAS.items() if module in modules), None)
        if extra is None:
            continue
        line = f"no module {module!r}, part of aura-platform[{extra}]: {_install(extra)}"
        if module in _EMBEDDED:
            variable = _EMBEDDED[module]
            line += f", or set {variable} (unset, it is the embedded default, which needs it)"
        return line
    return None
