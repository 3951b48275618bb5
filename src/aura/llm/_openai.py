"""The OpenAI-compatible provider: ``POST {base}/chat/completions`` with a Bearer key.

The answer and its stream are read by ``aura.llm.protocol`` (its doc says what counts as
an answer); a stream asks for its usage (``stream_options.include_usage``) unless the
caller said otherwise. Rate limits: ``Retry-After``, else, when
``x-ratelimit-remaining-requests`` is 0, ``x-ratelimit-reset-requests`` (OpenAI's "1m30s").
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aura.errors import LLMHTTPStatusError
from aura.llm._provider import (
    Headers,
    HoldOff,
    ProviderRequest,
    StreamParser,
    retry_after,
    status_error,
)
from aura.llm.protocol import Completion, StreamAssembler, parse_completion

__all__ = ["OpenAIProvider", "provider_hold_off"]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def provider_hold_off(headers: Headers) -> HoldOff | None:
    """How long the provider asks everyone to hold off: ``Retry-After`` seconds, else
    (when ``x-ratelimit-remaining-requests`` is 0) the request budget's full reset, in
    OpenAI's "1m30s" form; and whether it is the latter."""
    after = retry_after(headers)
    if after is not None:
        return HoldOff(after, False)
    if headers.get("x-ratelimit-remaining-requests") != "0":
        return None
    parts = _DURATION_PART.findall(headers.get("x-ratelimit-reset-requests", "")[:32])
    if not parts:
        return None
    return HoldOff(sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts), True)


@dataclass(frozen=True, slots=True)
class OpenAIProvider:
    """Chat completions at ``base_url`` (".../v1"); no ``api_key``: no Authorization."""

    base_url: str
    api_key: str = ""
    name: str = "openai"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def request(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        params: Mapping[str, Any],
        *,
        stream: bool,
    ) -> ProviderRequest:
        body = {"model": model, "messages": list(messages), **params}
        if stream:
            body["stream"] = True
            body.setdefault("stream_options", {"include_usage": True})
        return ProviderRequest("/chat/completions", body)

    def parse(self, content: bytes, latency_s: float) -> Completion:
        return parse_completion(content, latency_s)

    def stream_parser(self) -> StreamParser:
        return StreamAssembler()

    def error(
        self, status: int, headers: Headers, content: bytes, reason: str
    ) -> LLMHTTPStatusError:
        return status_error(status, headers, content, reason)

    def hold_off(self, status: int, headers: Headers) -> HoldOff | None:
        if status != 429 and "x-ratelimit-remaining-requests" not in headers:
            return None
        return provider_hold_off(headers)
