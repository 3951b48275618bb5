"""The Anthropic Messages API: ``POST {base}/messages`` (base ".../v1"), ``x-api-key``.

The request: ``{model, max_tokens, messages, system?}`` -- chat messages with the
``system`` role are joined into ``system``, ``max_tokens`` is required (default 1024),
other parameters go as they are. The answer ``{id, model, content: [{type: "text", text}
| {type: "tool_use", id, name, input}], usage: {input_tokens, output_tokens},
stop_reason}`` reads as a ``Completion`` in the chat vocabulary, so callers and metrics
need not know the provider:

    stop_reason                finish_reason      usage                 Usage
    -------------------------  -----------------  --------------------  -----------------
    end_turn, stop_sequence    stop               input_tokens          prompt_tokens
    max_tokens                 length (truncated) output_tokens         completion_tokens
    tool_use                   tool_calls         both                  total_tokens
    refusal                    content_filter

Errors are ``{type: "error", error: {type, message}}``; 529 (overloaded) is a 5xx, so it
counts toward the breaker as a 503 does, and 429 goes to the fleet's limiter. Rate
limits: ``Retry-After``, else, when ``anthropic-ratelimit-requests-remaining`` is 0,
``anthropic-ratelimit-requests-reset`` (an RFC 3339 time). A stream is server-sent
events (``message_start``, ``content_block_*``, ``message_delta``, ``message_stop``);
an ``error`` event mid-stream is the provider failing after it said 200.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aura.errors import LLMConnectionError, LLMHTTPStatusError
from aura.llm._provider import (
    MAX_ERROR_TEXT,
    Headers,
    HoldOff,
    ProviderRequest,
    StreamParser,
    malformed,
    retry_after,
    status_error,
)
from aura.llm.protocol import Choice, Completion, ToolCall, Usage
from aura.logs import bounded_text

__all__ = ["AnthropicProvider", "MessageStream"]

_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_SHAPE = "an Anthropic message"
_UNREADABLE = (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError)


def _usage(raw: Any) -> Usage:
    raw = raw if isinstance(raw, dict) else {}
    prompt, answer = int(raw.get("input_tokens") or 0), int(raw.get("output_tokens") or 0)
    return Usage(prompt, answer, prompt + answer)


def _completion(
    head: Mapping[str, Any], blocks: Sequence[Any], latency_s: float, *, streamed: bool
) -> Completion:
    """The message's content blocks as one choice: its text, and tool uses as calls."""
    texts: list[str] = []
    calls: list[ToolCall] = []
    for block in blocks:
        if block["type"] == "text":
            if not isinstance(block["text"], str):
                raise TypeError("a text block's text is not a string")
            texts.append(block["text"])
        elif block["type"] == "tool_use":
            arguments = block.get("input_json") or json.dumps(block.get("input") or {})
            calls.append(ToolCall(str(block.get("id") or ""), str(block["name"]), arguments))
    stop_reason = head.get("stop_reason")
    finish = _FINISH.get(stop_reason, stop_reason) if isinstance(stop_reason, str) else None
    content = "".join(texts) if texts or not calls else None
    choice = Choice(0, content, finish, tuple(calls))
    return Completion(
        text=content or "",
        model=str(head.get("model") or ""),
        usage=_usage(head.get("usage")),
        latency_s=latency_s,
        finish_reason=finish,
        response_id=head.get("id"),
        choices=(choice,),
        tool_calls=choice.tool_calls,
        streamed=streamed,
    )


@dataclass
class MessageStream:
    """Folds a Messages stream's server-sent events into one ``Completion``."""

    chunks: int = 0
    done: bool = False
    _buffer: str = ""
    _head: dict[str, Any] = field(default_factory=dict)
    _blocks: dict[int, dict[str, Any]] = field(default_factory=dict)

    def feed(self, text: str) -> list[str]:
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        return [delta for line in lines if (delta := self._line(line.rstrip("\r")))]

    def _line(self, line: str) -> str:
        if not line.startswith("data:"):
            return ""  # event: names, blank separators, comments
        try:
            event = json.loads(line[5:].strip())
            return self._event(event)
        except _UNREADABLE as exc:
            raise malformed("unreadable stream event", exc, shape=_SHAPE) from exc

    def _event(self, event: dict[str, Any]) -> str:
        kind = event["type"]
        if kind == "error":
            message = bounded_text(str(event["error"].get("message")), MAX_ERROR_TEXT)
            raise LLMConnectionError(f"the provider failed mid-stream: {message}")
        if kind == "message_start":
            self._head.update(event["message"])
        elif kind == "content_block_start":
            self._blocks[int(event["index"])] = dict(event["content_block"])
        elif kind == "content_block_delta":
            return self._delta(self._blocks[int(event["index"])], event["delta"])
        elif kind == "message_delta":
            self._head.update(event["delta"])
            usage = {**(self._head.get("usage") or {}), **(event.get("usage") or {})}
            self._head["usage"] = usage
        elif kind == "message_stop":
            self.done = True
        return ""

    def _delta(self, block: dict[str, Any], delta: dict[str, Any]) -> str:
        self.chunks += 1
        if delta["type"] == "text_delta":
            block["text"] = block.get("text", "") + delta["text"]
            return str(delta["text"])
        if delta["type"] == "input_json_delta":
            block["input_json"] = block.get("input_json", "") + delta["partial_json"]
        return ""

    def result(self, latency_s: float) -> Completion:
        if self._buffer.strip():
            self._line(self._buffer.strip())
            self._buffer = ""
        if self._head.get("stop_reason") is None:
            raise LLMConnectionError(
                f"the stream ended before the answer did ({self.chunks} chunks)"
            )
        try:
            blocks = [block for _, block in sorted(self._blocks.items())]
            return _completion(self._head, blocks, latency_s, streamed=True)
        except _UNREADABLE as exc:
            raise malformed("unreadable content block in the stream", exc, shape=_SHAPE) from exc


def _rfc3339_from_now(value: str) -> float | None:
    try:
        return max(datetime.fromisoformat(value[:64]).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class AnthropicProvider:
    """The Messages API at ``base_url`` (".../v1"); ``version``: anthropic-version."""

    base_url: str
    api_key: str = ""
    version: str = "2023-06-01"
    max_tokens: int = 1024  # the API requires it; a call's own max_tokens wins
    name: str = "anthropic"

    @property
    def headers(self) -> dict[str, str]:
        key = {"x-api-key": self.api_key} if self.api_key else {}
        return {**key, "anthropic-version": self.version}

    def request(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        params: Mapping[str, Any],
        *,
        stream: bool,
    ) -> ProviderRequest:
        system = [str(m.get("content") or "") for m in messages if m.get("role") == "system"]
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": self.max_tokens,
            "messages": [dict(m) for m in messages if m.get("role") != "system"],
            **params,
        }
        if system:
            body["system"] = "\n\n".join(system)
        if stream:
            body["stream"] = True
        return ProviderRequest("/messages", body)

    def parse(self, content: bytes, latency_s: float) -> Completion:
        try:
            body = json.loads(content)
            blocks = body["content"]
            if not isinstance(blocks, list):
                raise TypeError("content is not a list")
            return _completion(body, blocks, latency_s, streamed=False)
        except _UNREADABLE as exc:
            raise malformed("unreadable body", exc, shape=_SHAPE) from exc

    def stream_parser(self) -> StreamParser:
        return MessageStream()

    def error(
        self, status: int, headers: Headers, content: bytes, reason: str
    ) -> LLMHTTPStatusError:
        return status_error(status, headers, content, reason)

    def hold_off(self, status: int, headers: Headers) -> HoldOff | None:
        remaining = headers.get("anthropic-ratelimit-requests-remaining")
        if status != 429 and remaining is None:
            return None
        after = retry_after(headers)
        if after is not None:
            return HoldOff(after, False)
        if remaining != "0":
            return None
        reset = _rfc3339_from_now(headers.get("anthropic-ratelimit-requests-reset", ""))
        return None if reset is None else HoldOff(reset, True)
