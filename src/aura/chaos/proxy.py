"""A TCP proxy the chaos run owns, between its worker and a service, that breaks the network.

    worker ──► FaultProxy (127.0.0.1:free port) ──► PostgreSQL / RabbitMQ / Redis / LLM

Faults, each until ``heal()``:

    partition()        packets held both ways and new connections never reach the server:
                       reads hang until the client's own timeouts fire (a blackhole, as an
                       iptables DROP is; what a client did not give up on flows at heal,
                       as TCP's retransmissions would deliver it). One difference: the
                       proxy completes a new connection's TCP handshake, so it is the
                       client's protocol handshake (inside its connect timeout in asyncpg,
                       py-amqp and redis-py) that hangs, not connect()
    cut()              every open connection reset (RST), new ones reset at once
    slow(s, bytes/s)   ``s`` added to every chunk each way (pipelined, order kept), and a
                       bandwidth cap per direction
    cut_commit_replies(n)  PostgreSQL only: the next ``n`` commits (a COMMIT, or a write
                       that commits on its own in autocommit) reach the server, are
                       committed, and their reply is dropped with the connection: the
                       client cannot tell committed from not (the inbox must make its
                       retry safe)

Why our own and not toxiproxy: toxiproxy is a Go server binary, in neither PyPI nor
Debian (only its HTTP clients are on PyPI: toxiproxy-python needs the server), and it
cannot see a PostgreSQL COMMIT to drop its reply. This is ~300 lines of asyncio streams
on a loop thread of its own, so the faults do not depend on the run's own loop being free.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["FaultProxy", "NetworkProxies", "ProxyStats", "proxied_url"]

_CHUNK = 65536
_SSL_REQUEST, _GSS_REQUEST = 80877103, 80877104  # PostgreSQL's untyped pre-startup codes
_CONTROL_TIMEOUT_S = 10.0
_PARSE_LIMIT = 64 * 1024  # a longer statement text is read no further (not a write)
_HEADS = {b"Q": 5 + 16, b"B": 5 + 256}  # what deciding needs of a COMMIT and of a Bind


def proxied_url(url: str, port: int) -> str:
    """``url`` with its host and port replaced by the proxy's (user and path kept)."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{port}" if credentials else f"127.0.0.1:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class _CommitSpotter:
    """Reads a PostgreSQL client's byte stream (frontend messages) and counts its commit
    points: a simple-query COMMIT (what asyncpg sends to end a transaction), and the Sync
    after a write executed outside a transaction block -- a one-statement write in
    autocommit (``aura.db._statement``), which the server commits as it ends.

    Extended protocol, as asyncpg speaks it: Parse names a statement and gives its text;
    Bind names the statement it runs; Execute runs it; Sync ends the implicit transaction.
    A write is a statement whose text has INSERT, UPDATE or DELETE in it. BEGIN / COMMIT
    / ROLLBACK (simple queries) open and close a block, inside which no write commits."""

    def __init__(self) -> None:
        self._buffer = b""
        self._skip = 0
        self._untyped = True  # the startup message (and an SSL/GSS request) has no type byte
        self._writes: dict[bytes, bool] = {}  # statement name -> its text writes
        self._bound_write = False
        self._executed_write = False
        self._in_block = False

    def feed(self, data: bytes) -> int:
        commits = 0
        if self._skip:
            taken = min(self._skip, len(data))
            self._skip -= taken
            data = data[taken:]
        self._buffer += data
        while self._buffer:
            if self._untyped:
                if len(self._buffer) < 8:
                    break
                length, code = struct.unpack("!II", self._buffer[:8])
                self._untyped = code in (_SSL_REQUEST, _GSS_REQUEST)
                size = length
            else:
                if len(self._buffer) < 5:
                    break
                kind = self._buffer[:1]
                (length,) = struct.unpack("!I", self._buffer[1:5])
                size = length + 1
                if kind == b"P":
                    head = size if size <= _PARSE_LIMIT else 5
                else:
                    head = min(size, _HEADS.get(kind, 5))
                if len(self._buffer) < head:
                    break
                commits += self._message(kind, self._buffer[5:head], complete=head == size)
            if len(self._buffer) >= size:
                self._buffer = self._buffer[size:]
            else:
                self._skip = size - len(self._buffer)
                self._buffer = b""
        return commits

    def _message(self, kind: bytes, body: bytes, *, complete: bool) -> int:
        """One frontend message (``body``: its start, or all of it if ``complete``)."""
        if kind == b"Q":
            verb = body.lstrip().upper()
            if verb.startswith((b"BEGIN", b"START")):
                self._in_block = True
            elif verb.startswith((b"COMMIT", b"END")):
                self._in_block = False
                return 1
            elif verb.startswith((b"ROLLBACK", b"ABORT")):
                self._in_block = False
        elif kind == b"P":
            name, _, rest = body.partition(b"\x00")
            text = rest.partition(b"\x00")[0].upper() if complete else b""
            self._writes[name] = any(verb in text for verb in (b"INSERT", b"UPDATE", b"DELETE"))
        elif kind == b"B":
            statement = body.partition(b"\x00")[2].partition(b"\x00")[0]
            self._bound_write = self._writes.get(statement, False)
        elif kind == b"E":
            self._executed_write |= self._bound_write
        elif kind == b"S":
            committed = self._executed_write and not self._in_block
            self._executed_write = False
            return int(committed)
        return 0


@dataclass(eq=False)  # each link is itself (kept in a set)
class _Link:
    """One client connection and its upstream twin."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    swallow_reply: bool = False  # a COMMIT passed: drop what the server answers, then cut

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()


@dataclass
class ProxyStats:
    connections: int = 0
    refused: int = 0  # connections reset at once while cut
    reset: int = 0  # open connections reset by cut()
    held_chunks: int = 0  # chunks that waited out a partition
    commit_replies_cut: int = 0
    delayed_chunks: int = 0
    bytes: int = 0
    modes: list[str] = field(default_factory=list)


class FaultProxy:
    """One proxied service; its faults are set from any thread (see the module doc)."""

    def __init__(self, hub: NetworkProxies, name: str, host: str, port: int, *, postgres: bool):
        self.hub = hub
        self.name = name
        self.upstream = (host, port)
        self.postgres = postgres
        self.port = 0
        self.stats = ProxyStats()
        self._links: set[_Link] = set()
        self._open = asyncio.Event()
        self._open.set()
        self._cut = False
        self._latency_s = 0.0
        self._bandwidth = 0.0  # bytes per second per direction; 0: no cap
        self._commit_cuts = 0
        self._server: asyncio.Server | None = None

    # -- faults (from any thread) ---------------------------------------------------------
    def partition(self) -> None:
        self._control(self._set_partition)

    def cut(self) -> None:
        self._control(self._set_cut)

    def slow(self, latency_s: float, bandwidth: float = 0.0) -> None:
        def apply() -> None:
            self._latency_s, self._bandwidth = latency_s, bandwidth
            self.stats.modes.append(f"slow {latency_s:g} s {bandwidth:g} B/s")

        self._control(apply)

    def cut_commit_replies(self, count: int) -> None:
        if not self.postgres:
            raise ValueError(f"{self.name} is not PostgreSQL: it has no COMMIT to cut")

        def apply() -> None:
            self._commit_cuts = count
            self.stats.modes.append(f"cut {count} commit replies")

        self._control(apply)

    def heal(self) -> None:
        def apply() -> None:
            self._cut = False
            self._latency_s = self._bandwidth = 0.0
            self._commit_cuts = 0
            self._open.set()

        self._control(apply)

    @property
    def commit_cuts_left(self) -> int:
        return self._commit_cuts

    # -- the loop's side ------------------------------------------------------------------
    def _control(self, apply: Any) -> None:
        async def run() -> None:
            apply()

        asyncio.run_coroutine_threadsafe(run(), self.hub.loop).result(_CONTROL_TIMEOUT_S)

    def _set_partition(self) -> None:
        self._open.clear()
        self.stats.modes.append("partition")

    def _set_cut(self) -> None:
        self._cut = True
        self.stats.modes.append("cut")
        for link in list(self._links):
            link.abort()
            self.stats.reset += 1

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer)
        if self._cut:
            self.stats.refused += 1
            link.abort()
            return
        self._links.add(link)
        self.stats.connections += 1
        try:
            if not self._open.is_set():  # a partition: the server is never reached
                self.stats.held_chunks += 1
                await self._open.wait()
            up_reader, link.upstream = await asyncio.open_connection(*self.upstream)
            spotter = _CommitSpotter() if self.postgres else None
            await asyncio.gather(
                self._pump(reader, link.upstream, link, spotter),
                self._pump(up_reader, writer, link, None, from_server=True),
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # The proxies are closing: a handler must not end cancelled (asyncio's stream
            # callback would report it as an unhandled exception).
            return
        finally:
            self._links.discard(link)
            link.abort()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: _Link,
        spotter: _CommitSpotter | None,
        *,
        from_server: bool = False,
    ) -> None:
        """Read one direction into a queue, deliver it at its time: latency is pipelined
        (a chunk waits its own delay, not the ones before it) and order is kept."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                if due > (now := time.monotonic()):
                    self.stats.delayed_chunks += 1
                    await asyncio.sleep(due - now)
                if not self._open.is_set():
                    self.stats.held_chunks += 1
                    await self._open.wait()
                if from_server and link.swallow_reply:
                    # The server answered the COMMIT: it is committed; the client never
                    # hears so, and its connection is gone.
                    self.stats.commit_replies_cut += 1
                    link.abort()
                    return
                # Seen before it is sent: the reply cannot overtake the decision.
                if spotter is not None and spotter.feed(data) and self._commit_cuts:
                    self._commit_cuts -= 1
                    link.swallow_reply = True
                writer.write(data)
                self.stats.bytes += len(data)
                await writer.drain()
                if self._bandwidth:
                    await asyncio.sleep(len(data) / self._bandwidth)

        sender = asyncio.create_task(deliver())
        try:
            while not sender.done():
                data = await reader.read(_CHUNK)
                queue.put_nowait((time.monotonic() + self._latency_s, data))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()


class NetworkProxies:
    """The run's proxies, on an event loop thread of their own; a context manager."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.proxies: dict[str, FaultProxy] = {}
        self._thread = threading.Thread(target=self._run, name="chaos-proxies", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def __enter__(self) -> NetworkProxies:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for proxy in self.proxies.values():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(proxy._close(), self.loop).result(
                    _CONTROL_TIMEOUT_S
                )
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_cancel_the_rest(), self.loop).result(
                _CONTROL_TIMEOUT_S
            )
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=_CONTROL_TIMEOUT_S)
        if not self._thread.is_alive():
            self.loop.close()

    def add(self, name: str, url: str, *, postgres: bool = False) -> FaultProxy:
        """A proxy in front of the service at ``url`` (its host and port)."""
        parts = urlsplit(url)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.split("+")[0])
        if parts.hostname is None or port is None:
            raise ValueError(f"{name}: the URL names no host and port to proxy")
        proxy = FaultProxy(self, name, parts.hostname, port, postgres=postgres)
        asyncio.run_coroutine_threadsafe(proxy._listen(), self.loop).result(_CONTROL_TIMEOUT_S)
        self.proxies[name] = proxy
        return proxy

    def heal(self) -> None:
        for proxy in self.proxies.values():
            proxy.heal()

    def __iter__(self) -> Iterator[FaultProxy]:
        return iter(self.proxies.values())


# A URL without a port means its scheme's (postgresql://db/app is port 5432).
_DEFAULT_PORTS = {
    "postgresql": 5432,
    "postgres": 5432,
    "amqp": 5672,
    "pyamqp": 5672,
    "redis": 6379,
    "http": 80,
    "https": 443,
}


async def _cancel_the_rest() -> None:
    """Cancel every task on this loop but the caller, and wait for them to end."""
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
