"""A service the CLI could not use, said in one line: which service, its URL (password
masked) and the driver's own first line (``database "x" does not exist``, ``(403)
ACCESS_REFUSED``, ``Connection refused``).

``service_failure(exc, settings)`` recognizes the failure by the driver that raised it
anywhere in the exception's chain (asyncpg / SQLAlchemy / sqlite3, py-amqp / kombu,
redis-py, or a refused or timed-out socket under one of them) and returns the line, or
None for anything else (a bug keeps its traceback).

``check_database`` and ``check_broker`` are the pre-flight checks of the commands that
need the service (``aura gateway``, ``aura outbox relay``, ``aura demo`` on the real
services; ``aura dlq`` connects the same way): one connect, no retry, so a
misconfigured or stopped service stops the command at once instead of at the first
request. The broker's and Redis's connect is bounded by ``CONNECT_TIMEOUT`` (2 s: a
command typed at a terminal; a broker that takes longer is down for it), the database's
by ``DB_CONNECT_TIMEOUT``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aura.config import Settings, mask_url
from aura.errors import ServiceUnavailableError, cause_chain
from aura.logs import bounded_text

if TYPE_CHECKING:
    from kombu.connection import Connection

__all__ = ["CONNECT_TIMEOUT", "check_broker", "check_database", "connect_broker", "service_failure"]

CONNECT_TIMEOUT = 2.0

_MAX_FRAMES = 200

_DRIVERS = (
    ("asyncpg", "PostgreSQL"),
    ("sqlalchemy", "the database"),
    ("sqlite3", "SQLite"),
    ("aiosqlite", "SQLite"),
    ("amqp", "RabbitMQ"),
    ("kombu", "RabbitMQ"),
    ("redis", "Redis"),
)


def _driver(module: str) -> str | None:
    for prefix, service in _DRIVERS:
        if module == prefix or module.startswith(prefix + "."):
            return service
    return None


def _service_of(exc: BaseException) -> str | None:
    """The service whose driver raised ``exc``: by its type, else (a bare OSError from a
    socket) by the deepest driver frame it passed through."""
    found = _driver(type(exc).__module__)
    if found is not None or not isinstance(exc, OSError):
        return found
    frames, tb = 0, exc.__traceback__
    while tb is not None and frames < _MAX_FRAMES:
        found = _driver(str(tb.tb_frame.f_globals.get("__name__", ""))) or found
        tb, frames = tb.tb_next, frames + 1
    return found


def _first_line(exc: BaseException) -> str:
    original = getattr(exc, "orig", None) or exc
    text = str(original).strip().splitlines()
    line = text[0] if text else type(original).__name__
    if isinstance(original, TimeoutError) and not text:
        line = "no answer (timed out)"
    return bounded_text(line, 300)


def service_failure(exc: BaseException, settings: Settings) -> str | None:
    """The one line for a service failure in ``exc``'s chain, or None if it is not one."""
    chain = cause_chain(exc)
    if isinstance(exc, ServiceUnavailableError):
        return str(exc)
    found = [s for s in (_service_of(link) for link in reversed(chain)) if s is not None]
    if not found:
        return None
    service = found[0]  # the deepest driver that raised
    if service in {"PostgreSQL", "SQLite", "the database"}:
        from aura.db import database_url

        url = database_url(settings)
        service = "SQLite" if url.startswith("sqlite") else "PostgreSQL"
    elif service == "RabbitMQ":
        url = settings.celery_broker_url or "memory://"
    else:
        url = settings.redis_url or "(embedded)"
    cause = chain[-1]  # the driver's own words are at the bottom of the chain
    return f"cannot use {service} at {mask_url(url)}: {_first_line(cause)}"


async def check_database(settings: Settings) -> None:
    """Connect once to DATABASE_URL (bounded by DB_CONNECT_TIMEOUT); raise if it fails."""
    from aura.db import reach

    await reach(settings)


def connect_broker(url: str, timeout: float = CONNECT_TIMEOUT, **options: object) -> Connection:
    """A connection to the broker, each node of a ``;``-separated list tried once in turn
    and each bounded by ``timeout`` (kombu's ``connect()`` tries again after 2 s, its
    retries wait 2, 4, 6 s..., and with no retry it never tries a list's second node);
    raise the last failure if none answers. The connection keeps the whole list (the
    node that answered first) for kombu's own failover. The caller closes it."""
    from kombu.connection import Connection

    from aura.messaging.topology import broker_nodes

    nodes = broker_nodes(url) or [url]
    failure: BaseException | None = None
    for index in range(len(nodes)):
        listed = ";".join(nodes[index:] + nodes[:index])
        connection = Connection(listed, connect_timeout=timeout, **options)  # type: ignore[no-untyped-call]
        try:
            connection.ensure_connection(max_retries=0)  # type: ignore[no-untyped-call]
        except Exception as exc:  # that node is down: the next may answer
            connection.release()  # type: ignore[no-untyped-call]
            failure = exc
            continue
        return connection
    assert failure is not None
    raise failure


def check_broker(url: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Connect once to the broker (no retry, bounded by ``timeout``); raise if it fails."""
    connect_broker(url, timeout).release()  # type: ignore[no-untyped-call]
