"""The chaos run's TCP proxy (``aura.chaos.proxy``) against small servers of the test's own:
each fault does what the scenarios rely on, and heal undoes it."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aura.chaos.proxy import NetworkProxies, _CommitSpotter, proxied_url

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def _startup() -> bytes:
    ssl_request = struct.pack("!II", 8, 80877103)
    body = struct.pack("!I", 196608) + b"user\x00postgres\x00\x00"
    return ssl_request + struct.pack("!I", len(body) + 4) + body


_QUERIES = st.sampled_from(
    [b"COMMIT;", b"  commit", b"SELECT 'COMMIT'", b"BEGIN", b"ROLLBACK;", b"x" * 70_000]
)


@settings(max_examples=60, deadline=None)
@given(
    queries=st.lists(st.tuples(st.sampled_from([b"Q", b"P", b"B"]), _QUERIES), max_size=8),
    size=st.integers(min_value=1, max_value=80_000),
)
def test_the_spotter_counts_commit_queries_in_any_split_of_the_stream(
    queries: list[tuple[bytes, bytes]], size: int
) -> None:
    stream = _startup() + b"".join(_message(kind, text + b"\x00") for kind, text in queries)
    expected = sum(
        1 for kind, text in queries if kind == b"Q" and text.lstrip().upper().startswith(b"COMMIT")
    )
    spotter = _CommitSpotter()
    chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
    assert sum(spotter.feed(chunk) for chunk in chunks) == expected


# The extended protocol as asyncpg speaks it: Parse (name, text) once per statement, then
# Bind + Execute + Sync per run; BEGIN/COMMIT/ROLLBACK as simple queries.
_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("P"), st.sampled_from([b"s1", b"s2", b""]), st.booleans()),
        st.tuples(st.just("run"), st.sampled_from([b"s1", b"s2", b""]), st.booleans()),
        st.tuples(st.just("Q"), st.sampled_from([b"BEGIN;", b"COMMIT;", b"ROLLBACK;"]), st.none()),
    ),
    max_size=14,
)
_WRITE = b"WITH claim AS (INSERT INTO processed_messages VALUES ($1)) SELECT 1"


@settings(max_examples=80, deadline=None)
@given(steps=_STEPS, size=st.integers(min_value=1, max_value=200))
def test_the_spotter_counts_autocommit_writes_as_commits(
    steps: list[tuple[str, bytes, bool | None]], size: int
) -> None:
    """A model of the server: a run of a write statement outside a block commits at its
    Sync; a COMMIT commits; nothing else does (a Sync with no Execute before it, a read,
    a write inside BEGIN ... ROLLBACK)."""
    stream, expected = _startup(), 0
    writes: dict[bytes, bool] = {}
    in_block = False
    for kind, name, flag in steps:
        if kind == "P":
            text = _WRITE if flag else b"SELECT fingerprint FROM processed_messages"
            writes[name] = bool(flag)
            stream += _message(b"P", name + b"\x00" + text + b"\x00" + b"\x00\x00")
        elif kind == "run":
            stream += _message(b"B", b"\x00" + name + b"\x00" + b"\x00" * 6)
            if flag:  # Execute, then Sync; else a Sync alone (a prepare's)
                stream += _message(b"E", b"\x00\x00\x00\x00\x00")
                expected += int(writes.get(name, False) and not in_block)
            stream += _message(b"S", b"")
        else:
            stream += _message(b"Q", name + b"\x00")
            in_block = name == b"BEGIN;"
            expected += int(name == b"COMMIT;")
    spotter = _CommitSpotter()
    chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
    assert sum(spotter.feed(chunk) for chunk in chunks) == expected


def test_proxied_url_keeps_credentials_and_path() -> None:
    assert (
        proxied_url("amqp://guest:guest@10.0.0.1:5672/vh%2Fx", 4000)
        == "amqp://guest:guest@127.0.0.1:4000/vh%2Fx"
    )
    assert proxied_url("http://127.0.0.1:9/v1", 81) == "http://127.0.0.1:81/v1"


class _Server:
    """A server of the test's own whose handlers end quietly when the test does."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"tcp://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.handler(reader, writer)
        except (asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(4096):
        writer.write(data)
        await writer.drain()


async def _ask(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(data)), 5)
    finally:
        writer.close()


@pytest.mark.timeout(30)
def test_partition_holds_until_heal_and_then_delivers() -> None:
    async def main() -> None:
        async with _Server(_echo) as url:
            with NetworkProxies() as network:
                proxy = network.add("echo", url)
                assert await _ask(proxy.port, b"before") == b"before"
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                await asyncio.to_thread(proxy.partition)
                writer.write(b"held")
                await writer.drain()
                with pytest.raises(TimeoutError):  # the read hangs until a timeout fires
                    await asyncio.wait_for(reader.readexactly(4), 0.5)
                assert proxy.stats.held_chunks >= 1
                await asyncio.to_thread(proxy.heal)
                assert await asyncio.wait_for(reader.readexactly(4), 5) == b"held"
                writer.close()

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_cut_resets_open_connections_and_refuses_new_ones_until_heal() -> None:
    async def main() -> None:
        async with _Server(_echo) as url:
            with NetworkProxies() as network:
                proxy = network.add("echo", url)
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                writer.write(b"ping")
                assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
                await asyncio.to_thread(proxy.cut)
                with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                    await asyncio.wait_for(reader.readexactly(1), 5)
                with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                    await _ask(proxy.port, b"refused")
                writer.close()
                assert proxy.stats.reset == 1
                assert proxy.stats.refused >= 1
                await asyncio.to_thread(proxy.heal)
                assert await _ask(proxy.port, b"again") == b"again"

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_slow_delays_every_chunk_and_keeps_the_order() -> None:
    async def main() -> None:
        async with _Server(_echo) as url:
            with NetworkProxies() as network:
                proxy = network.add("echo", url)
                await asyncio.to_thread(proxy.slow, 0.05, 1_000_000)
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                sent = b"".join(bytes([i]) * 100 for i in range(20))
                for i in range(0, len(sent), 100):
                    writer.write(sent[i : i + 100])
                    await writer.drain()
                assert await asyncio.wait_for(reader.readexactly(len(sent)), 10) == sent
                assert proxy.stats.delayed_chunks >= 2  # both ways
                writer.close()

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_a_cut_commit_reply_is_committed_at_the_server_and_never_reaches_the_client() -> None:
    seen: list[bytes] = []

    async def fake_postgres(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(8)  # the SSL request
        writer.write(b"N")
        (length,) = struct.unpack("!I", await reader.readexactly(4))
        await reader.readexactly(length - 4)
        writer.write(_message(b"Z", b"I"))
        while kind := await reader.read(1):
            (length,) = struct.unpack("!I", await reader.readexactly(4))
            seen.append(kind + (await reader.readexactly(length - 4)))
            writer.write(_message(b"C", b"OK\x00") + _message(b"Z", b"I"))
            await writer.drain()

    async def main() -> None:
        async with _Server(fake_postgres) as url:
            with NetworkProxies() as network:
                proxy = network.add("postgres", url, postgres=True)
                await asyncio.to_thread(proxy.cut_commit_replies, 1)
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                writer.write(_startup()[:8])
                assert await asyncio.wait_for(reader.readexactly(1), 5) == b"N"
                writer.write(_startup()[8:])
                await asyncio.wait_for(reader.readexactly(6), 5)
                writer.write(_message(b"Q", b"INSERT 1\x00"))
                await asyncio.wait_for(reader.readexactly(14), 5)  # answered
                writer.write(_message(b"Q", b"COMMIT;\x00"))
                with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                    await asyncio.wait_for(reader.readexactly(1), 5)
                writer.close()
                assert seen == [b"QINSERT 1\x00", b"QCOMMIT;\x00"]  # the server committed
                assert proxy.stats.commit_replies_cut == 1
                assert proxy.commit_cuts_left == 0

    asyncio.run(main())


@pytest.mark.parametrize(
    ("url", "port"),
    [
        ("postgresql+asyncpg://postgres@db/test", 5432),
        ("postgres://db/test", 5432),
        ("amqp://guest:guest@mq//", 5672),
        ("redis://cache/0", 6379),
        ("postgresql://db:6543/test", 6543),
    ],
)
def test_a_url_without_a_port_is_proxied_to_its_schemes_port(url: str, port: int) -> None:
    """`aura chaos all` with DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1/test
    crashed every network scenario ("the URL names no host and port")."""
    with NetworkProxies() as network:
        made = network.add("service", url)
    assert made.upstream == (urlsplit(url).hostname, port)
