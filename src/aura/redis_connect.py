"""The one place Aura makes Redis clients from ``REDIS_URL``, a single server or a Sentinel
group's current master.

    REDIS_URL form                                              client
    redis://[[user]:password@]host[:port][/db]                  that server (redis-py's
    rediss://... (TLS), unix:///path/to/socket[?db=N]           own URL forms)
    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]
                       [?sentinel_password=...]                 the master the sentinels
                                                                name for ``service``

For a Sentinel URL the hosts are the sentinels (port 26379 when left out); user and
password are the Redis servers' (the master's), ``sentinel_password`` the sentinels' own.

What a failover looks like from here (redis-py 8.2's ``redis.asyncio.sentinel``, read for
this). Each new connection asks the sentinels, one at a time (the last one that answered
first), for the master's address and takes the first answer whose master is not down.
While none is named, each command fails at once: a refused connection, then
``MasterNotFoundError`` (a ``ConnectionError``). Once the sentinels name a new master, the
pool drops its idle connections; one in use keeps its address until it fails (the async
pool does not check, on release, whose it is): to a dead master at once; to a demoted one
that still lives, its next write answers ``READONLY``, which the sentinel connection turns
into a ``ConnectionError`` after dropping itself (a read there may see the replica's copy
until then). Nothing is retried here: each of those is a ``RedisError``, so the Aura user
takes its "Redis cannot help" fallback (``aura.redis_errors``) for that one call, and the
next connection finds the new master. Each sentinel is asked with short timeouts
(``SENTINEL_TIMEOUT``): one that does not answer costs a call that long, never seconds.

Accepted, written down (Sentinel's own rule, not Aura's): a sentinel that has not yet
learnt of a failover names the old master, and if that server is back (empty, a master
until the sentinels demote it) a connection made through that sentinel writes there; what
is written there is lost when it is demoted. Aura's Redis state is an optimisation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

import redis
import redis.asyncio
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelPool
from redis.sentinel import Sentinel as SyncSentinel

from aura.errors import ConfigurationError

__all__ = [
    "SENTINEL_SCHEME",
    "SENTINEL_TIMEOUT",
    "SentinelTarget",
    "async_redis",
    "parse_sentinel_url",
    "redis_url_problem",
    "sync_redis",
    "validate_redis_url",
]

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_TIMEOUT = 0.3  # seconds, to connect to or hear from one sentinel (at most)
_DEFAULT_SENTINEL_PORT = 26379
_SERVER_SCHEMES = ("redis", "rediss", "unix")
_SENTINEL_OPTIONS = frozenset({"sentinel_password"})
_OPTION_NAME = re.compile(r"[a-z_]{1,40}")
_FORM = "redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]"


@dataclass(frozen=True)
class SentinelTarget:
    """A ``redis+sentinel://`` URL, parsed: where the sentinels are, which service's master
    to follow, its database and credentials. ``repr`` never shows a password."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None

    def __repr__(self) -> str:
        hosts = ",".join(_host_text(host, port) for host, port in self.sentinels)
        return f"SentinelTarget({SENTINEL_SCHEME}://{hosts}/{self.service}/{self.db})"

    def to_url(self) -> str:
        """The URL again (it holds the passwords: never log it)."""
        auth = ""
        if self.username is not None or self.password is not None:
            auth = quote(self.username or "", safe="")
            if self.password is not None:
                auth += ":" + quote(self.password, safe="")
            auth += "@"
        hosts = ",".join(_host_text(host, port) for host, port in self.sentinels)
        query = ""
        if self.sentinel_password is not None:
            query = "?sentinel_password=" + quote(self.sentinel_password, safe="")
        service = quote(self.service, safe="")
        return f"{SENTINEL_SCHEME}://{auth}{hosts}/{service}/{self.db}{query}"


def _host_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bad(problem: str) -> ConfigurationError:
    """One line naming what is wrong; never the URL itself (it may hold a password)."""
    return ConfigurationError(f"REDIS_URL: {problem}")


def _port(text: str, where: str) -> int:
    if not text.isascii() or not text.isdigit() or not 0 < int(text) < 65536:
        raise _bad(f"{where}: the port must be a number from 1 to 65535")
    return int(text)


def _sentinel_address(entry: str, index: int) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port`` -> (host, port)."""
    where = f"sentinel {index}"
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise _bad(f"{where}: an IPv6 address is written [address]:port")
        has_port, port_text = bool(rest), rest[1:]
    else:
        host, colon, port_text = entry.partition(":")
        has_port = bool(colon)
    if not host or any(c in host for c in "/?#@[] ") or not host.isprintable():
        raise _bad(f"{where}: expected host[:port], the sentinels separated by commas")
    return host, _port(port_text, where) if has_port else _DEFAULT_SENTINEL_PORT


def _service_and_db(path: str) -> tuple[str, int]:
    """``service``, ``service/db`` (a trailing ``/`` allowed) -> (service, db)."""
    parts = path.removesuffix("/").split("/")
    if not parts[0] or len(parts) > 2:
        raise _bad(f"expected a service name and an optional database: {_FORM}")
    service = unquote(parts[0])
    if not service.isprintable() or not service.strip() or " " in service:
        raise _bad("the service name must be a word (the name the sentinels monitor)")
    db_text = parts[1] if len(parts) == 2 else ""
    if db_text and not (db_text.isascii() and db_text.isdigit()):
        raise _bad("the database (after the service name) must be a number")
    return service, int(db_text or 0)


def _options(query: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in _SENTINEL_OPTIONS:
            shown = repr(name) if _OPTION_NAME.fullmatch(name) else "a parameter"
            raise _bad(f"{shown} is not a Sentinel URL option (known: sentinel_password)")
        options[name] = value
    return options


def parse_sentinel_url(url: str) -> SentinelTarget:
    """A ``redis+sentinel://`` URL as a ``SentinelTarget``; ``ConfigurationError`` in one
    line naming what is wrong (the URL itself is never echoed: it may hold a password)."""
    scheme, sep, rest = url.strip().partition("://")
    if not sep or scheme.lower() != SENTINEL_SCHEME:
        raise _bad(f"a Sentinel URL starts {SENTINEL_SCHEME}://")
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    auth, at, hosts = netloc.rpartition("@")
    if not hosts or not slash:
        raise _bad(f"expected {_FORM}")
    username = password = None
    if at:
        user_text, colon, password_text = auth.partition(":")
        username = unquote(user_text) if user_text else None
        password = unquote(password_text) if colon else None
    entries = hosts.split(",")
    sentinels = tuple(_sentinel_address(e, i) for i, e in enumerate(entries, start=1))
    service, db = _service_and_db(path)
    options = _options(query)
    return SentinelTarget(
        sentinels, service, db, username, password, options.get("sentinel_password")
    )


def validate_redis_url(url: str) -> str:
    """``url`` if Aura can make a client of it, else ``ConfigurationError`` (one line, no
    password): a ``redis+sentinel://`` URL parsed in full, the others by redis-py's own
    parser, with a database path that is a number."""
    scheme = url.strip().partition("://")[0].lower()
    if scheme == SENTINEL_SCHEME:
        parse_sentinel_url(url)
        return url
    if scheme not in _SERVER_SCHEMES or "://" not in url:
        raise _bad("expected a URL with scheme redis, rediss, unix or redis+sentinel")
    try:
        options = redis.connection.parse_url(url.strip())  # type: ignore[no-untyped-call]
    except ValueError as exc:
        said = str(exc)  # "Invalid value for 'db' ..." names the part; a port's echoes it
        raise _bad(
            said[:120]
            if said.startswith("Invalid value for")
            else "the host and port are host[:port], the port a number from 1 to 65535"
        ) from None
    path = url.partition("://")[2].partition("?")[0].partition("/")[2].strip("/")
    if scheme != "unix" and path and "db" not in options:
        raise _bad("the database (the URL's path) must be a number")
    return url


def redis_url_problem(url: str) -> str | None:
    """What is wrong with ``url`` as a REDIS_URL (one line, no password), or None: the
    check ``aura.config`` makes, as a ``ValueError`` of its own."""
    try:
        validate_redis_url(url)
    except ConfigurationError as exc:
        return str(exc).removeprefix("REDIS_URL: ")
    return None


def _sentinel_kwargs(target: SentinelTarget, socket_timeout: float, connect: float) -> Any:
    kwargs: dict[str, Any] = {
        "socket_timeout": min(socket_timeout, SENTINEL_TIMEOUT),
        "socket_connect_timeout": min(connect, SENTINEL_TIMEOUT),
    }
    if target.sentinel_password is not None:
        kwargs["password"] = target.sentinel_password
    return kwargs


def _server_kwargs(target: SentinelTarget, socket_timeout: float, connect: float) -> Any:
    return {
        "db": target.db,
        "username": target.username,
        "password": target.password,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect,
    }


class _SentinelPool(AsyncSentinelPool):
    """A sentinel pool that closes its sentinels' connections with its own."""

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            await self.sentinel_manager.aclose()


class _BlockingSentinelPool(_SentinelPool, redis.asyncio.BlockingConnectionPool):
    """The master's pool, waiting (bounded by ``timeout``) for a free connection when all
    are in use, as ``BlockingConnectionPool`` does, instead of raising at once.

    MRO: the sentinel pool's ``__init__`` (its connection class, the master's address)
    hands the rest to ``BlockingConnectionPool.__init__`` (``max_connections``,
    ``timeout``); its ``get_connection`` and ``release`` wait on the pool's condition, and
    the sentinel connection's ``connect`` asks the sentinels for the master."""


def async_redis(
    url: str,
    *,
    max_connections: int | None = None,
    pool_timeout: float = 5.0,
    socket_timeout: float = 2.0,
    socket_connect_timeout: float = 2.0,
) -> redis.asyncio.Redis:
    """An asyncio client of ``url`` (any REDIS_URL form), owning its pool (``aclose()``
    closes it, sentinels' connections included). With ``max_connections``, a call finding
    every connection in use waits up to ``pool_timeout`` seconds for one, then raises
    ``ConnectionError`` (back-pressure, a ``RedisError`` like any other)."""
    validate_redis_url(url)
    if url.strip().lower().startswith(SENTINEL_SCHEME + "://"):
        target = parse_sentinel_url(url)
        sentinel = AsyncSentinel(
            target.sentinels,
            sentinel_kwargs=_sentinel_kwargs(target, socket_timeout, socket_connect_timeout),
        )
        pool_options: dict[str, Any] = {}
        pool_class: type[AsyncSentinelPool] = _SentinelPool
        if max_connections is not None:
            pool_class = _BlockingSentinelPool
            pool_options = {"max_connections": max_connections, "timeout": pool_timeout}
        client: redis.asyncio.Redis = sentinel.master_for(
            target.service,
            connection_pool_class=pool_class,
            **_server_kwargs(target, socket_timeout, socket_connect_timeout),
            **pool_options,
        )
        return client
    timeouts: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_connect_timeout,
    }
    if max_connections is None:
        pool = redis.asyncio.ConnectionPool.from_url(url.strip(), **timeouts)
    else:
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url.strip(), max_connections=max_connections, timeout=pool_timeout, **timeouts
        )
    return redis.asyncio.Redis.from_pool(pool)


def sync_redis(
    url: str, *, socket_timeout: float = 5.0, socket_connect_timeout: float = 2.0
) -> redis.Redis:
    """A blocking client of ``url`` (any REDIS_URL form), for the CLI. For a Sentinel URL
    its sentinels' connections are closed with the process (a command is short)."""
    validate_redis_url(url)
    if not url.strip().lower().startswith(SENTINEL_SCHEME + "://"):
        return redis.Redis.from_url(
            url.strip(),
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
        )
    target = parse_sentinel_url(url)
    sentinel = SyncSentinel(
        target.sentinels,
        sentinel_kwargs=_sentinel_kwargs(target, socket_timeout, socket_connect_timeout),
    )
    client: redis.Redis = sentinel.master_for(
        target.service, **_server_kwargs(target, socket_timeout, socket_connect_timeout)
    )
    return client
