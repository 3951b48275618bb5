"""What the simulator does wrong (``Faults``), the replies it builds, and the limits it
keeps per model as a provider would (``ProviderLimits``: GCRA, x-ratelimit-* headers).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from aura.llm._sim_dialects import CHAT, ChatDialect, MessagesDialect

__all__ = [
    "Dialect",
    "Faults",
    "ProviderLimits",
    "Reply",
    "error_reply",
    "json_reply",
    "reset_connection",
    "retry_after_headers",
]


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
class Reply:
    outcome: str  # what the stats call it: ok, 500, hang, trickle, reset, malformed, ...
    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    delay: float = 0.0
    trickle: float = 0.0  # seconds between body bytes (events, streamed); 0: all at once
    reset: bool = False
    events: list[bytes] | None = None  # a server-sent-event stream instead of a body
    midstream: str = ""  # streams: "reset" after _MIDSTREAM_AFTER events


def json_reply(outcome: str, status: int, payload: Any, **extra: Any) -> Reply:
    return Reply(outcome, status, json.dumps(payload).encode(), **extra)


Dialect = ChatDialect | MessagesDialect


def error_reply(
    status: int, message: str, *, outcome: str = "", dialect: Dialect = CHAT, **extra: Any
) -> Reply:
    return json_reply(outcome or str(status), status, dialect.error(status, message), **extra)


class ProviderLimits:
    """GCRA per model, as providers limit: requests and tokens per minute (``Faults.rpm``,
    ``tpm``), with ``rate_burst_s`` seconds' worth of either at once."""

    def __init__(self) -> None:
        self._tats: dict[tuple[str, str], float] = {}  # (model, kind) -> arrival time

    def check(self, model: str, faults: Faults, tokens: int) -> tuple[float, list[tuple[str, str]]]:
        """How long the call is over the limit (> 0: refused, nothing charged; else it is
        charged), and the x-ratelimit-* headers that say where the model stands."""
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
        over = max(waits, default=0.0)
        if over <= 0:
            for key, new_tat in updates:
                self._tats[key] = new_tat
        return over, headers


def retry_after_headers(faults: Faults) -> list[tuple[str, str]]:
    return [] if faults.retry_after is None else [("retry-after", f"{faults.retry_after:g}")]


def reset_connection(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashing proxy would."""
    sock = writer.get_extra_info("socket")
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
