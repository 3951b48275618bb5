"""The provider seam: one LLM API's wire format, apart from how it is sent.

A ``Provider`` builds a request (a path under its base URL, its headers, a JSON body)
from messages and parameters, reads an answer into a ``Completion`` (text, usage, finish
reason), folds a stream, and reads a failed answer (status, headers, body) as Aura's
``LLMHTTPStatusError`` plus the hold-off its rate-limit headers ask of the fleet. It does
no I/O and keeps no state between calls: ``aura.llm._wire`` sends, and
``ResilientLLMClient`` decides (deadlines, breakers, the fleet's limiter).

    provider     module        request                          rate-limit headers
    -----------  ------------  -------------------------------  -----------------------------
    openai       _openai.py    POST /chat/completions, Bearer   x-ratelimit-*-requests
    anthropic    _anthropic.py POST /messages, x-api-key        anthropic-ratelimit-requests-*

Adding one is a module implementing ``Provider`` and its line in ``PROVIDERS``
(``aura.llm._providers``), which ``LLM_PROVIDER`` names. Headers are read through any
case-insensitive mapping (httpx's and aiohttp's both are).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from aura.errors import LLMHTTPStatusError, LLMMalformedResponseError
from aura.logs import bounded_text

if TYPE_CHECKING:
    from aura.llm.protocol import Completion

__all__ = [
    "HoldOff",
    "Provider",
    "ProviderRequest",
    "StreamParser",
    "error_message",
    "error_text",
    "malformed",
    "retry_after",
    "status_error",
]

MAX_ERROR_TEXT = 200
Headers = Mapping[str, str]


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    """What to send: ``path`` under the provider's base URL, and the JSON ``body``."""

    path: str
    body: dict[str, Any]


class HoldOff(NamedTuple):
    """How long the provider asks everyone to wait; ``full_reset``: the budget's whole
    reset (a spent budget), not a ``Retry-After``."""

    seconds: float
    full_reset: bool


class StreamParser(Protocol):
    """Folds a streamed answer's decoded text into one ``Completion``."""

    chunks: int  # events with content in them: the first one is the first token
    done: bool  # the provider said the stream is over

    def feed(self, text: str) -> list[str]:
        """Take text as it comes; return the first choice's content deltas it completed."""
        ...

    def result(self, latency_s: float) -> Completion:
        """The completion; ``LLMConnectionError`` if the stream stopped before the answer."""
        ...


class Provider(Protocol):
    """One LLM API's wire format (see the module doc)."""

    @property
    def name(self) -> str:
        """Its PROVIDERS name: "openai", "anthropic"."""
        ...

    @property
    def base_url(self) -> str:
        """Without a trailing "/"."""
        ...

    @property
    def headers(self) -> dict[str, str]:
        """Sent with every request (credentials, API version)."""
        ...

    def request(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        params: Mapping[str, Any],
        *,
        stream: bool,
    ) -> ProviderRequest: ...

    def parse(self, content: bytes, latency_s: float) -> Completion:
        """A 2xx answer's body; ``LLMMalformedResponseError`` if it is not an answer."""
        ...

    def stream_parser(self) -> StreamParser: ...

    def error(
        self, status: int, headers: Headers, content: bytes, reason: str
    ) -> LLMHTTPStatusError:
        """A non-2xx answer as Aura's error: the provider's message, ``Retry-After``."""
        ...

    def hold_off(self, status: int, headers: Headers) -> HoldOff | None:
        """What the fleet should wait, if this answer's rate-limit headers say so."""
        ...


def retry_after(headers: Headers) -> float | None:
    """``Retry-After`` in seconds (a number or an HTTP date), never negative."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None


def error_message(content: bytes) -> str | None:
    """``error.message`` of a JSON error body (both providers' shape), if any."""
    try:
        body = json.loads(content)
        error = body.get("error", {}) if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
    except (ValueError, AttributeError, RecursionError):
        return None
    return str(message) if message else None


def error_text(content: bytes, reason: str) -> str:
    """The provider's message (else the reason phrase), on one line, bounded."""
    text = error_message(content) or reason or "no reason given"
    return bounded_text(" ".join(text.split()), MAX_ERROR_TEXT)


def status_error(status: int, headers: Headers, content: bytes, reason: str) -> LLMHTTPStatusError:
    """A non-2xx answer whose body carries ``error.message`` (both providers' shape)."""
    return LLMHTTPStatusError(status, error_text(content, reason), retry_after=retry_after(headers))


def malformed(
    what: str, exc: BaseException | None = None, *, shape: str = "a chat completion"
) -> LLMMalformedResponseError:
    """The provider's answer is not ``shape``: its fault, so it counts toward the breaker."""
    detail = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    return LLMMalformedResponseError(
        bounded_text(f"the provider's answer is not {shape}: {what}{detail}", MAX_ERROR_TEXT)
    )
