"""The LLM simulator: an OpenAI-compatible ``/v1/chat/completions`` with fault injection.

It is the stand-in for the LLM provider in tests, the demo and the chaos suite, so it
has to misbehave the way real providers do, down to the socket: it answers over raw
asyncio streams with h11 (the HTTP/1.1 state machine httpx itself uses), which lets it
hang, trickle bytes and reset connections -- things an ASGI framework hides.

Answers are deterministic from the input: for a product it returns JSON with a short
description and tags. Faults (``Faults``) are set at start and changed while it runs:

    POST /admin/faults   {"error_rate": 0.3, ...}   update some fault settings
    POST /admin/outage   {"seconds": 10, "mode": "error"|"reset"|"hang"}
    POST /admin/reset                               zero the counters
    GET  /admin/stats                               requests received, by outcome

Random faults come from a seeded generator, so a run with the same seed and the same
requests misbehaves the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import h11

__all__ = ["Faults", "LLMSimulator", "enrichment_for"]

OutageMode = Literal["error", "reset", "hang"]
_MAX_BODY = 1_000_000
_TAG_WORDS = 5


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
    api_key: str | None = None  # when set, requests must carry it (else 401)

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


def enrichment_for(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The deterministic answer: a description and tags made from the last user message."""
    prompt = next(
        (str(m.get("content", "")) for m in reversed(messages) if m.get("role") == "user"), ""
    )
    try:
        product = json.loads(prompt)
    except ValueError:
        product = None
    if not isinstance(product, dict):
        product = {"title": prompt[:80]}
    title = str(product.get("title") or "this product")
    brand = product.get("brand")
    category = product.get("category")
    words = [w.strip(".,:;!?()").lower() for w in f"{title} {category or ''}".split()]
    tags = sorted({w for w in words if len(w) > 2})[:_TAG_WORDS]
    digest = hashlib.sha256(prompt.encode()).hexdigest()[:6]
    description = f"{title}{f' by {brand}' if brand else ''}: built to last, made to be used."
    return {"description": description, "tags": tags, "ref": digest}


def _completion(body: dict[str, Any]) -> dict[str, Any]:
    messages = body.get("messages")
    assert isinstance(messages, list)
    content = json.dumps(enrichment_for(messages))
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
    completion_tokens = len(content.split())
    return {
        "id": "chatcmpl-" + hashlib.sha256(content.encode()).hexdigest()[:16],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(body.get("model", "aura-sim")),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


@dataclass
class _Reply:
    outcome: str  # what the stats call it: ok, 500, hang, trickle, reset, malformed, ...
    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    delay: float = 0.0
    trickle: float = 0.0  # seconds between body bytes; 0: all at once
    reset: bool = False


def _json(outcome: str, status: int, payload: Any, **extra: Any) -> _Reply:
    return _Reply(outcome, status, json.dumps(payload).encode(), **extra)


def _error(status: int, message: str, *, outcome: str = "", **extra: Any) -> _Reply:
    payload = {"error": {"message": message, "type": "simulated", "code": status}}
    return _json(outcome or str(status), status, payload, **extra)


class LLMSimulator:
    """Run with ``async with LLMSimulator(faults) as sim:`` (``sim.base_url``), or in a
    background thread with ``with LLMSimulator(...).running_in_thread() as sim:``."""

    def __init__(
        self, faults: Faults | None = None, *, host: str = "127.0.0.1", port: int = 0, seed: int = 0
    ) -> None:
        self.faults = faults or Faults()
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

    # -- what to answer ---------------------------------------------------------------------

    async def _handle(self, request: h11.Request, body: bytes) -> _Reply:
        path = request.target.decode().split("?", 1)[0]
        method = request.method.decode()
        if path.startswith("/admin/"):
            return self._admin(method, path, body)
        if path == "/healthz":
            return _json("health", 200, {"status": "ok"})
        if path not in {"/v1/chat/completions", "/chat/completions"} or method != "POST":
            return _error(404, f"no route {method} {path}")
        self.stats["requests"] += 1
        reply = self._chat(request, body)
        self.stats[f"outcome:{reply.outcome}"] += 1
        return reply

    def _chat(self, request: h11.Request, body: bytes) -> _Reply:
        faults = self.faults
        if time.monotonic() < self._outage_until:
            mode = self._outage_mode
            if mode == "reset":
                return _Reply("outage", reset=True)
            if mode == "hang":
                return _error(503, "outage", outcome="outage", delay=faults.hang_seconds)
            return _error(503, "simulated outage", outcome="outage", headers=_retry_after(faults))
        if faults.api_key is not None:
            sent = dict(request.headers).get(b"authorization", b"").decode()
            if sent != f"Bearer {faults.api_key}":
                return _error(401, "invalid API key")
        try:
            parsed = json.loads(body)
            if not isinstance(parsed, dict) or not isinstance(parsed.get("messages"), list):
                raise ValueError("a JSON object with a 'messages' list is required")
            if not parsed["messages"]:
                raise ValueError("'messages' must not be empty")
        except ValueError as exc:
            return _error(400, str(exc)[:200])
        delay = faults.latency + (self._random.uniform(0, faults.jitter) if faults.jitter else 0)
        answer = _completion(parsed)
        roll = self._random.random()
        for rate, make in (
            (faults.error_rate, self._status_error),
            (faults.hang_rate, lambda: _json("hang", 200, answer, delay=faults.hang_seconds)),
            (
                faults.trickle_rate,
                lambda: _json("trickle", 200, answer, trickle=faults.trickle_interval),
            ),
            (faults.reset_rate, lambda: _Reply("reset", reset=True)),
            (faults.malformed_rate, lambda: _Reply("malformed", 200, b'{"choices": [{"mess')),
        ):
            if roll < rate:
                return make()
            roll -= rate
        return _json("ok", 200, answer, delay=delay)

    def _status_error(self) -> _Reply:
        status = self._random.choice(self.faults.error_statuses)
        headers = _retry_after(self.faults) if status in (429, 503) else []
        return _error(status, "simulated failure", headers=headers)

    def _admin(self, method: str, path: str, body: bytes) -> _Reply:
        try:
            payload = json.loads(body) if body else {}
            if method == "GET" and path == "/admin/stats":
                stats = {"requests": self.requests, "by_outcome": self.outcomes()}
                return _json("admin", 200, stats)
            if method == "POST" and path == "/admin/faults":
                self.faults.update(payload)
                return _json("admin", 200, dataclasses.asdict(self.faults))
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
