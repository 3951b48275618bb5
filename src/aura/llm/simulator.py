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
    GET  /admin/usage                               tokens answered, by user

A streamed answer meets the same faults as a plain one, and three of its own, mid-stream:
``midstream_reset_rate`` (the connection is reset after the first chunks),
``midstream_error_rate`` (an ``{"error": ...}`` event, then the end) and
``malformed_rate`` (a broken event). ``latency`` delays the first chunk (the time to the
first token) and ``trickle_interval`` paces the chunks of a trickled stream.

Random faults come from a seeded generator, so a run with the same seed and the same
requests misbehaves the same way.

Each answered call's tokens are kept as a provider bills them (``usage_log``: arrival,
user, total tokens), by the end user the request names: OpenAI's ``user`` field, or
Anthropic's ``metadata.user_id`` ("" when none), so a test can count a tenant's tokens
where they are spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Literal

import h11

from aura.llm._sim_dialects import DIALECTS
from aura.llm._sim_faults import (
    Dialect,
    Faults,
    ProviderLimits,
    Reply,
    error_reply,
    json_reply,
    reset_connection,
    retry_after_headers,
)
from aura.llm._sim_http import read_request, send, send_stream
from aura.llm.simulator_answers import completion_for, enrichment_for

__all__ = ["DEFAULT_MODELS", "Faults", "LLMSimulator", "enrichment_for"]

OutageMode = Literal["error", "reset", "hang"]
_MIDSTREAM_AFTER = 3  # chunks sent before a mid-stream fault
DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o")
_MAX_USAGE_LOG = 100_000


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
        self._limits = ProviderLimits()
        self.host = host
        self.port = port
        self.stats: Counter[str] = Counter()
        self.usage_log: list[tuple[float, str, int]] = []  # (monotonic, user, total tokens)
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
            request, body = await read_request(connection, reader)
            if request is None:
                return
            reply = await self._handle(request, body)
            if reply.reset:
                reset_connection(writer)
                return
            if reply.events is not None:
                sent = await send_stream(connection, writer, reply, reset_after=_MIDSTREAM_AFTER)
                if sent == "abandoned":
                    self.stats["stream_abandoned"] += 1
                if sent != "sent":
                    return
            else:
                await send(connection, writer, reply)
            if connection.our_state is h11.MUST_CLOSE:
                return
            connection.start_next_cycle()

    # -- what to answer ---------------------------------------------------------------------

    async def _handle(self, request: h11.Request, body: bytes) -> Reply:
        path = request.target.decode().split("?", 1)[0]
        method = request.method.decode()
        if path.startswith("/admin/"):
            return self._admin(method, path, body)
        if path == "/healthz":
            return json_reply("health", 200, {"status": "ok"})
        if method == "GET" and path.removeprefix("/v1").startswith("/models"):
            return self._models(path.removeprefix("/v1").removeprefix("/models").strip("/"))
        dialect = DIALECTS.get(path)
        if dialect is None or method != "POST":
            return error_reply(404, f"no route {method} {path}")
        self.stats["requests"] += 1
        reply = self._chat(request, body, dialect)
        self.stats[f"outcome:{reply.outcome}"] += 1
        return reply

    def offered_models(self) -> tuple[str, ...]:
        listed = self.models if self.models is not None else DEFAULT_MODELS
        return tuple(dict.fromkeys((*listed, *self.model_faults)))

    def _models(self, model: str) -> Reply:
        cards = {
            name: {"id": name, "object": "model", "created": 0, "owned_by": "aura-sim"}
            for name in self.offered_models()
        }
        if not model:
            return json_reply("models", 200, {"object": "list", "data": list(cards.values())})
        if model in cards:
            return json_reply("models", 200, cards[model])
        return error_reply(404, f"The model '{model}' does not exist", outcome="models")

    def faults_for(self, model: str) -> Faults:
        return self.model_faults.get(model, self.faults)

    def _chat(self, request: h11.Request, body: bytes, dialect: Dialect) -> Reply:
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        model = str(parsed.get("model") or "aura-sim") if isinstance(parsed, dict) else ""
        faults = self.faults_for(model)
        if time.monotonic() < self._outage_until:
            mode = self._outage_mode
            if mode == "reset":
                return Reply("outage", reset=True)
            if mode == "hang":
                return error_reply(
                    503, "outage", outcome="outage", delay=faults.hang_seconds, dialect=dialect
                )
            retry = retry_after_headers(faults)
            return error_reply(
                503, "simulated outage", outcome="outage", headers=retry, dialect=dialect
            )
        if faults.api_key is not None and not dialect.authorized(
            dict(request.headers), faults.api_key
        ):
            return error_reply(401, "invalid API key", dialect=dialect)
        try:
            parsed = dialect.chat_request(parsed)
        except ValueError as exc:
            return error_reply(400, str(exc)[:200], dialect=dialect)
        if self.models is not None and model not in self.offered_models():
            return error_reply(404, f"The model '{model}' does not exist", dialect=dialect)
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
            return self._billed(reply, parsed, tokens)
        answer = dialect.answer(completion)
        faulty: list[tuple[float, Callable[[], Reply]]] = [
            (faults.error_rate, lambda: self._status_error(faults, dialect)),
            (faults.hang_rate, lambda: json_reply("hang", 200, answer, delay=faults.hang_seconds)),
            (
                faults.trickle_rate,
                lambda: json_reply("trickle", 200, answer, trickle=faults.trickle_interval),
            ),
            (faults.reset_rate, lambda: Reply("reset", reset=True)),
            (faults.malformed_rate, lambda: Reply("malformed", 200, dialect.malformed_body)),
        ]
        reply = self._roll(faulty) or json_reply("ok", 200, answer, delay=delay, headers=headers)
        return self._billed(reply, parsed, tokens)

    def _billed(self, reply: Reply, body: dict[str, Any], tokens: int) -> Reply:
        """An answer (200) bills its tokens to the request's user."""
        if reply.status == 200 and not reply.reset:
            metadata = body.get("metadata")
            user = body.get("user") or (
                metadata.get("user_id") if isinstance(metadata, dict) else ""
            )
            if len(self.usage_log) >= _MAX_USAGE_LOG:
                del self.usage_log[: _MAX_USAGE_LOG // 2]
            self.usage_log.append((time.monotonic(), str(user or "")[:128], tokens))
        return reply

    def _rate_limit(
        self, model: str, faults: Faults, tokens: int, dialect: Dialect
    ) -> tuple[Reply | None, list[tuple[str, str]]]:
        """A 429 with Retry-After over the model's limit; its rate-limit headers always."""
        over, headers = self._limits.check(model, faults, tokens)
        if over > 0:
            self.stats["rate_limited"] += 1
            retry = [("retry-after", f"{over:.3f}"), *dialect.rate_headers(headers)]
            limited = error_reply(
                429, "Rate limit reached", outcome="429", headers=retry, dialect=dialect
            )
            return limited, []
        return None, dialect.rate_headers(headers)

    def _streamed(
        self, body: dict[str, Any], faults: Faults, delay: float, dialect: Dialect
    ) -> Reply:
        events = dialect.events(body)
        broken = list(events)
        broken[_MIDSTREAM_AFTER:] = [dialect.broken_event]
        failed = list(events)
        failed[_MIDSTREAM_AFTER:] = [dialect.failure_event()]
        faulty: list[tuple[float, Callable[[], Reply]]] = [
            (faults.error_rate, lambda: self._status_error(faults, dialect)),
            (faults.hang_rate, lambda: Reply("hang", events=events, delay=faults.hang_seconds)),
            (
                faults.trickle_rate,
                lambda: Reply("trickle", events=events, trickle=faults.trickle_interval),
            ),
            (faults.reset_rate, lambda: Reply("reset", reset=True)),
            (faults.malformed_rate, lambda: Reply("malformed", events=broken, delay=delay)),
            (
                faults.midstream_reset_rate,
                lambda: Reply("midstream_reset", events=events, midstream="reset", delay=delay),
            ),
            (faults.midstream_error_rate, lambda: Reply("midstream_error", events=failed)),
        ]
        return self._roll(faulty) or Reply("ok", events=events, delay=delay)

    def _roll(self, faulty: list[tuple[float, Callable[[], Reply]]]) -> Reply | None:
        """One die for all faults: each takes its rate's share of [0, 1)."""
        roll = self._random.random()
        for rate, make in faulty:
            if roll < rate:
                return make()
            roll -= rate
        return None

    def _status_error(self, faults: Faults, dialect: Dialect) -> Reply:
        status = self._random.choice(faults.error_statuses)
        headers = retry_after_headers(faults) if status in (429, 503, 529) else []
        return error_reply(status, "simulated failure", headers=headers, dialect=dialect)

    def _admin(self, method: str, path: str, body: bytes) -> Reply:
        try:
            payload = json.loads(body) if body else {}
            if method == "GET" and path == "/admin/stats":
                stats = {"requests": self.requests, "by_outcome": self.outcomes()}
                return json_reply("admin", 200, stats)
            if method == "GET" and path == "/admin/usage":
                return json_reply("admin", 200, {"tokens_by_user": self.tokens_by_user()})
            if method == "POST" and path == "/admin/faults":
                model = payload.pop("model", None)
                if model is None:
                    self.faults.update(payload)
                    return json_reply("admin", 200, dataclasses.asdict(self.faults))
                faults = self.model_faults.setdefault(str(model), Faults())
                faults.update(payload)
                return json_reply("admin", 200, dataclasses.asdict(faults))
            if method == "POST" and path == "/admin/outage":
                mode = payload.get("mode", "error")
                if mode not in ("error", "reset", "hang"):
                    raise ValueError("mode must be error, reset or hang")
                self.start_outage(float(payload["seconds"]), mode)
                return json_reply("admin", 200, {"outage_seconds": float(payload["seconds"])})
            if method == "POST" and path == "/admin/reset":
                self.stats.clear()
                self.usage_log.clear()
                return json_reply("admin", 200, {"requests": 0})
        except (ValueError, KeyError, TypeError) as exc:
            return error_reply(400, f"{type(exc).__name__}: {exc}"[:200])
        return error_reply(404, f"no admin route {method} {path}")

    def outcomes(self) -> dict[str, int]:
        """Chat requests by what the simulator did with them (ok, 500, reset, ...)."""
        return {
            key.removeprefix("outcome:"): count
            for key, count in self.stats.items()
            if key.startswith("outcome:")
        }

    def tokens_by_user(self) -> dict[str, int]:
        """Tokens answered, by the user each request named (see the module doc)."""
        totals: Counter[str] = Counter()
        for _, user, tokens in self.usage_log:
            totals[user] += tokens
        return dict(totals)
