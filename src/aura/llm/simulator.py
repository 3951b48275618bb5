"""The LLM simulator: OpenAI's ``/v1/chat/completions`` and Anthropic's ``/v1/messages``
with fault injection.

It is the stand-in for the LLM provider in tests, the demo and the chaos suite, so it
has to misbehave the way real providers do, down to the socket: it answers over raw
asyncio streams with h11 (the HTTP/1.1 state machine httpx itself uses), which lets it
hang, trickle bytes and reset connections -- things an ASGI framework hides.

It speaks what the client speaks (``simulator_answers``): tool calls, several choices,
``max_tokens`` cuts, JSON answers, usage, server-sent-event streaming, and
``GET /v1/models``; each API in its own shape (``_sim_dialects``), with the same faults.
Answers are deterministic from the input: for a product it returns JSON with a short
description and tags. Faults (``Faults``) are set at start, per model if wanted
(``model_faults``), and changed while it runs:

    POST /admin/faults   {"error_rate": 0.3, ...}   update some fault settings
                         {"model": "m", ...}        ... of one model's faults
    POST /admin/outage   {"seconds": 10, "mode": "error"|"reset"|"hang"}
    POST /admin/reset                               zero the counters
    GET  /admin/stats                               requests received, by outcome

A streamed answer meets the same faults as a plain one, and three of its own, mid-stream:
``midstream_reset_rate`` (the connection is reset after the first chunks),
``midstream_error_rate`` (an ``{"error": ...}`` event, then the end) and
``malformed_rate`` (a broken event). ``latency`` delays the first chunk (the time to the
first token) and ``trickle_interval`` paces the chunks of a trickled stream.

Random faults come from a seeded generator, so a run with the same seed and the same
requests misbehaves the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import h11

from aura.llm._sim_dialects import CHAT, DIALECTS, ChatDialect, MessagesDialect
from aura.llm.simulator_answers import completion_for, enrichment_for

__all__ = ["DEFAULT_MODELS", "Faults", "LLMSimulator", "enrichment_for"]

OutageMode = Literal["error", "reset", "hang"]
_MAX_BODY = 1_000_000
_MIDSTREAM_AFTER = 3  # chunks sent before a mid-stream fault
DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o")


@dataclass
class Faults:
    """What the simulator does wrong, and how often (rates are fractions of requests)."""

    latency: float = 0.0  # seconds added to every answer
    jitter: float = 0.0  # plus a random 0..jitter seconds
    error_rate: float = 0.0  # answer with one of error_statuses
    error_statuses: tuple[int, ...] = (500, 503, 429)
    retry_after: float | None = 1.0  # Retry-After sent with 429 and 503
    hang_rate: float = 0.0  # wait hang_seconds before answering
    hang_seconds: float = 30.0
    trickle_rate: float = 0.0  # send the body one byte every trickle_interval seconds
    trickle_interval: float = 0.5
    reset_rate: float = 0.0  # reset the connection instead of answering
    malformed_rate: float = 0.0  # answer 200 with a body that is not a completion
    midstream_reset_rate: float = 0.0  # streams only: reset after the first chunks
    midstream_error_rate: float = 0.0  # streams only: an error event after the first chunks
    api_key: str | None = None  # when set, requests must carry it (else 401)
    rpm: float = 0.0  # provider-style limits (0: none): over them, 429 + Retry-After
    tpm: float = 0.0  # tokens counted as prompt words + the answer's words
    rate_burst_s: float = 1.0  # seconds' worth of either budget that may go at once

    def update(self, changes: dict[str, Any]) -> None:
        """Apply ``changes`` (field -> value); unknown fields and bad values raise."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(changes) - names
        if unknown:
            raise ValueError(f"unknown fault settings: {', '.join(sorted(unknown))}")
        for name, value in changes.items():
            if name.endswith("_rate") and not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
            if name == "error_statuses":
                value = tuple(int(code) for code in value)
            setattr(self, name, value)


@dataclass
class _Reply:
    outcome: str  # what the stats call it: ok, 500, hang, trickle, reset, malformed, ...
    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    delay: float = 0.0
    trickle: float = 0.0  # seconds between body bytes (events, streamed); 0: all at once
    reset: bool = False
    events: list[bytes] | None = None  # a server-sent-event stream instead of a body
    midstream: str = ""  # streams: "reset" after _MIDSTREAM_AFTER events


def _json(outcome: str, status: int, payload: Any, **extra: Any) -> _Reply:
    return _Reply(outcome, status, json.dumps(payload).encode(), **extra)


Dialect = ChatDialect | MessagesDialect


def _error(
    status: int, message: str, *, outcome: str = "", dialect: Dialect = CHAT, **extra: Any
) -> _Reply:
    return _json(outcome or str(status), status, dialect.error(status, message), **extra)


class LLMSimulator:
    """Run with ``async with LLMSimulator(faults) as sim:`` (``sim.base_url``), or in a
    background thread with ``with LLMSimulator(...).running_in_thread() as sim:``."""

    def __init__(
        self,
        faults: Faults | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
        models: tuple[str, ...] | None = None,
        model_faults: dict[str, Faults] | None = None,
    ) -> None:
        self.faults = faults or Faults()
        # Models offered: with a list, any other model is a 404 (as providers answer)
        self.models = models
        self.model_faults = dict(model_faults or {})
        self._tats: dict[tuple[str, str], float] = {}  # (model, kind) -> GCRA arrival time
        self.host = host
        self.port = port
        self.stats: Counter[str] = Counter()
        self._random = random.Random(seed)
        self._outage_until = 0.0
        self._outage_mode: OutageMode = "error"
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def requests(self) -> int:
        """Chat-completion requests received (whatever was done with them)."""
        return self.stats["requests"]

    def start_outage(self, seconds: float, mode: OutageMode = "error") -> None:
        self._outage_until = time.monotonic() + seconds
        self._outage_mode = mode

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> LLMSimulator:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()

    @contextlib.contextmanager
    def running_in_thread(self) -> Iterator[LLMSimulator]:
        """Serve from a daemon thread with its own event loop (for synchronous callers)."""
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.start())
            started.set()
            loop.run_forever()

        thread = threading.Thread(target=run, name="llm-simulator", daemon=True)
        thread.start()
        if not started.wait(timeout=10):
            raise RuntimeError("the LLM simulator did not start within 10 s")
        try:
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()

    # -- one connection ---------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._converse(reader, writer)
        except (ConnectionError, h11.ProtocolError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = h11.Connection(h11.SERVER)
        while True:
            request, body = await self._read_request(connection, reader)
            if request is None:
                return
            reply = await self._handle(request, body)
            if reply.reset:
                _reset(writer)
                return
            if reply.events is not None:
                if not await self._send_stream(connection, writer, reply):
                    return
            else:
                await self._send(connection, writer, reply)
            if connection.our_state is h11.MUST_CLOSE:
                return
            connection.start_next_cycle()

    async def _read_request(
        self, connection: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[h11.Request | None, bytes]:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                connection.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > _MAX_BODY:
                    raise h11.ProtocolError("request body too large")
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            else:  # ConnectionClosed (or PAUSED, which start_next_cycle prevents)
                return None, b""

    async def _send(
        self, connection: h11.Connection, writer: asyncio.StreamWriter, reply: _Reply
    ) -> None:
        if reply.delay:
            await asyncio.sleep(reply.delay)
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(reply.body))),
            *reply.headers,
        ]
        writer.write(connection.send(h11.Response(status_code=reply.status, headers=headers)))
        if reply.trickle:
            for index in range(len(reply.body)):
                writer.write(connection.send(h11.Data(data=reply.body[index : index + 1])))
                await writer.drain()
                await asyncio.sleep(reply.trickle)
        else:
            writer.write(connection.send(h11.Data(data=reply.body)))
        writer.write(connection.send(h11.EndOfMessage()))
        await writer.drain()

    async def _send_stream(
        self, connection: h11.Connection, writer: asyncio.StreamWriter, reply: _Reply
    ) -> bool:
        """Send an SSE stream; False when the connection is gone (reset, or the client
        hung up: counted as ``stream_abandoned``)."""
        assert reply.events is not None
        if reply.delay:
            await asyncio.sleep(reply.delay)  # the time to the first token
        headers = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
        try:
            writer.write(connection.send(h11.Response(status_code=200, headers=headers)))
            for index, event in enumerate(reply.events):
                if reply.midstream == "reset" and index == _MIDSTREAM_AFTER:
                    _reset(writer)
                    return False
                writer.write(connection.send(h11.Data(data=event)))
                await writer.drain()
                if writer.is_closing():
                    raise ConnectionResetError("the client closed the stream")
                if reply.trickle:
                    await asyncio.sleep(reply.trickle)
            writer.write(connection.send(h11.EndOfMessage()))
            await writer.drain()
        except ConnectionError:
            self.stats["stream_abandoned"] += 1
            return False
        return True

    # -- what to answer ---------------------------------------------------------------------

    async def _handle(self, request: h11.Request, body: bytes) -> _Reply:
        path = request.target.decode().split("?", 1)[0]
        method = request.method.decode()
        if path.startswith("/admin/"):
            return self._admin(method, path, body)
        if path == "/healthz":
            return _json("health", 200, {"status": "ok"})
        if method == "GET" and path.removeprefix("/v1").startswith("/models"):
            return self._models(path.removeprefix("/v1").removeprefix("/models").strip("/"))
        dialect = DIALECTS.get(path)
        if dialect is None or method != "POST":
            return _error(404, f"no route {method} {path}")
        self.stats["requests"] += 1
        reply = self._chat(request, body, dialect)
        self.stats[f"outcome:{reply.outcome}"] += 1
        return reply

    def offered_models(self) -> tuple[str, ...]:
        listed = self.models if self.models is not None else DEFAULT_MODELS
        return tuple(dict.fromkeys((*listed, *self.model_faults)))

    def _models(self, model: str) -> _Reply:
        cards = {
            name: {"id": name, "object": "model", "created": 0, "owned_by": "aura-sim"}
            for name in self.offered_models()
        }
        if not model:
            return _json("models", 200, {"object": "list", "data": list(cards.values())})
        if model in cards:
            return _json("models", 200, cards[model])
        return _error(404, f"The model '{model}' does not exist", outcome="models")

    def faults_for(self, model: str) -> Faults:
        return self.model_faults.get(model, self.faults)

    def _chat(self, request: h11.Request, body: bytes, dialect: Dialect) -> _Reply:
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        model = str(parsed.get("model") or "aura-sim") if isinstance(parsed, dict) else ""
        faults = self.faults_for(model)
        if time.monotonic() < self._outage_until:
            mode = self._outage_mode
            if mode == "reset":
                return _Reply("outage", reset=True)
            if mode == "hang":
                return _error(
                    503, "outage", outcome="outage", delay=faults.hang_seconds, dialect=dialect
                )
            retry = _retry_after(faults)
            return _error(503, "simulated outage", outcome="outage", headers=retry, dialect=dialect)
        if faults.api_key is not None and not dialect.authorized(
            dict(request.headers), faults.api_key
        ):
            return _error(401, "invalid API key", dialect=dialect)
        try:
            parsed = dialect.chat_request(parsed)
        except ValueError as exc:
            return _error(400, str(exc)[:200], dialect=dialect)
        if self.models is not None and model not in self.offered_models():
            return _error(404, f"The model '{model}' does not exist", dialect=dialect)
        parsed["model"] = model
        delay = faults.latency + (self._random.uniform(0, faults.jitter) if faults.jitter else 0)
        completion = completion_for(parsed)
        tokens = completion["usage"]["total_tokens"]
        limited, headers = self._rate_limit(model, faults, tokens, dialect)
        if limited is not None:
            return limited
        if parsed.get("stream"):
            reply = self._streamed(parsed, faults, delay, dialect)
            reply.headers += headers
            return reply
        answer = dialect.answer(completion)
        faulty: list[tuple[float, Callable[[], _Reply]]] = [
            (faults.error_rate, lambda: self._status_error(faults, dialect)),
            (faults.hang_rate, lambda: _json("hang", 200, answer, delay=faults.hang_seconds)),
            (
                faults.trickle_rate,
                lambda: _json("trickle", 200, answer, trickle=faults.trickle_interval),
            ),
            (faults.reset_rate, lambda: _Reply("reset", reset=True)),
            (faults.malformed_rate, lambda: _Reply("malformed", 200, dialect.malformed_body)),
        ]
        return self._roll(faulty) or _json("ok", 200, answer, delay=delay, headers=headers)

    def _rate_limit(
        self, model: str, faults: Faults, tokens: int, dialect: Dialect
    ) -> tuple[_Reply | None, list[tuple[str, str]]]:
        """GCRA per model, as providers limit: a 429 with Retry-After over the limit, and
        x-ratelimit-* headers on every answer."""
        now = time.monotonic()
        headers: list[tuple[str, str]] = []
        waits: list[float] = []
        updates: list[tuple[tuple[str, str], float]] = []
        for kind, per_minute, cost in (("requests", faults.rpm, 1), ("tokens", faults.tpm, tokens)):
            if per_minute <= 0:
                continue
            interval = 60.0 / per_minute
            burst = interval * max(per_minute / 60.0 * faults.rate_burst_s, cost)
            tat = max(self._tats.get((model, kind), now), now)
            new_tat = tat + interval * cost
            wait = new_tat - burst - now
            waits.append(wait)
            updates.append(((model, kind), new_tat))
            remaining = max(int((burst - (new_tat - now)) / interval), 0) if wait <= 0 else 0
            headers += [
                (f"x-ratelimit-limit-{kind}", f"{per_minute:g}"),
                (f"x-ratelimit-remaining-{kind}", str(remaining)),
                (f"x-ratelimit-reset-{kind}", f"{max(new_tat - now, 0.0):.3f}s"),
            ]
        if waits and max(waits) > 0:
            self.stats["rate_limited"] += 1
            retry = [("retry-after", f"{max(waits):.3f}"), *dialect.rate_headers(headers)]
            return _error(
                429, "Rate limit reached", outcome="429", headers=retry, dialect=dialect
            ), []
        for key, new_tat in updates:
            self._tats[key] = new_tat
        return None, dialect.rate_headers(headers)

    def _streamed(
        self, body: dict[str, Any], faults: Faults, delay: float, dialect: Dialect
    ) -> _Reply:
        events = dialect.events(body)
        broken = list(events)
        broken[_MIDSTREAM_AFTER:] = [dialect.broken_event]
        failed = list(events)
        failed[_MIDSTREAM_AFTER:] = [dialect.failure_event()]
        faulty: list[tuple[float, Callable[[], _Reply]]] = [
            (faults.error_rate, lambda: self._status_error(faults, dialect)),
            (faults.hang_rate, lambda: _Reply("hang", events=events, delay=faults.hang_seconds)),
            (
                faults.trickle_rate,
                lambda: _Reply("trickle", events=events, trickle=faults.trickle_interval),
            ),
            (faults.reset_rate, lambda: _Reply("reset", reset=True)),
            (faults.malformed_rate, lambda: _Reply("malformed", events=broken, delay=delay)),
            (
                faults.midstream_reset_rate,
                lambda: _Reply("midstream_reset", events=events, midstream="reset", delay=delay),
            ),
            (faults.midstream_error_rate, lambda: _Reply("midstream_error", events=failed)),
        ]
        return self._roll(faulty) or _Reply("ok", events=events, delay=delay)

    def _roll(self, faulty: list[tuple[float, Callable[[], _Reply]]]) -> _Reply | None:
        """One die for all faults: each takes its rate's share of [0, 1)."""
        roll = self._random.random()
        for rate, make in faulty:
            if roll < rate:
                return make()
            roll -= rate
        return None

    def _status_error(self, faults: Faults, dialect: Dialect) -> _Reply:
        status = self._random.choice(faults.error_statuses)
        headers = _retry_after(faults) if status in (429, 503, 529) else []
        return _error(status, "simulated failure", headers=headers, dialect=dialect)

    def _admin(self, method: str, path: str, body: bytes) -> _Reply:
        try:
            payload = json.loads(body) if body else {}
            if method == "GET" and path == "/admin/stats":
                stats = {"requests": self.requests, "by_outcome": self.outcomes()}
                return _json("admin", 200, stats)
            if method == "POST" and path == "/admin/faults":
                model = payload.pop("model", None)
                if model is None:
                    self.faults.update(payload)
                    return _json("admin", 200, dataclasses.asdict(self.faults))
                faults = self.model_faults.setdefault(str(model), Faults())
                faults.update(payload)
                return _json("admin", 200, dataclasses.asdict(faults))
            if method == "POST" and path == "/admin/outage":
                mode = payload.get("mode", "error")
                if mode not in ("error", "reset", "hang"):
                    raise ValueError("mode must be error, reset or hang")
                self.start_outage(float(payload["seconds"]), mode)
                return _json("admin", 200, {"outage_seconds": float(payload["seconds"])})
            if method == "POST" and path == "/admin/reset":
                self.stats.clear()
                return _json("admin", 200, {"requests": 0})
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, f"{type(exc).__name__}: {exc}"[:200])
        return _error(404, f"no admin route {method} {path}")

    def outcomes(self) -> dict[str, int]:
        """Chat requests by what the simulator did with them (ok, 500, reset, ...)."""
        return {
            key.removeprefix("outcome:"): count
            for key, count in self.stats.items()
            if key.startswith("outcome:")
        }


def _retry_after(faults: Faults) -> list[tuple[str, str]]:
    return [] if faults.retry_after is None else [("retry-after", f"{faults.retry_after:g}")]


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashing proxy would."""
    sock = writer.get_extra_info("socket")
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
