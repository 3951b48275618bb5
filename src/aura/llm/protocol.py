"""What an OpenAI-compatible chat completion says, read strictly enough and no more.

A completion is an answer whatever its ``finish_reason``: ``stop``, ``length`` (cut at
``max_tokens``: the caller decides whether a cut answer will do), ``tool_calls`` (the
message's ``content`` is null and ``tool_calls`` carries the work), ``content_filter``.
What is *not* an answer, and so ``LLMMalformedResponseError`` (the provider's fault, it
counts toward the breaker): a body that is not JSON, no ``choices`` list or an empty one,
a choice without a ``message`` object, content neither a string nor null, a tool call
without a function name, or a stream that stops before any choice finished.

Streaming (``stream: true``) arrives as server-sent events, one ``data: {chunk}`` per
event and ``data: [DONE]`` last. ``StreamAssembler`` folds the chunks into the same
``Completion`` a non-streaming call returns: contents and tool-call arguments are
concatenated per choice index, usage comes from the last chunk that carries it
(``stream_options: {"include_usage": true}``). An ``{"error": ...}`` event mid-stream is
the provider failing after it said 200, so it is a provider failure too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aura.errors import LLMConnectionError
from aura.llm._provider import MAX_ERROR_TEXT as _MAX_ERROR_TEXT
from aura.llm._provider import malformed as _malformed
from aura.logs import bounded_text

__all__ = [
    "Choice",
    "Completion",
    "StreamAssembler",
    "ToolCall",
    "Usage",
    "parse_completion",
]


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function the model asks the caller to run; ``arguments`` is the model's JSON
    text, as sent (it may not parse: that is the caller's call, not the provider's)."""

    id: str
    name: str
    arguments: str
    type: str = "function"


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    content: str | None
    finish_reason: str | None
    tool_calls: tuple[ToolCall, ...] = ()
    refusal: str | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    """One chat completion. ``text`` is the first choice's content ("" when it has none,
    as with tool calls); ``model`` is the model that answered (after any fallback)."""

    text: str
    model: str
    usage: Usage
    latency_s: float
    finish_reason: str | None = None
    response_id: str | None = None
    choices: tuple[Choice, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()  # the first choice's
    streamed: bool = False

    @property
    def truncated(self) -> bool:
        """The answer was cut at ``max_tokens`` (``finish_reason == "length"``)."""
        return self.finish_reason == "length"


def _usage(raw: Any) -> Usage:
    if not isinstance(raw, dict):
        return Usage()
    return Usage(
        int(raw.get("prompt_tokens") or 0),
        int(raw.get("completion_tokens") or 0),
        int(raw.get("total_tokens") or 0),
    )


def _tool_call(raw: Any) -> ToolCall:
    function = raw["function"]
    name = function["name"]
    arguments = function.get("arguments") or ""
    if not isinstance(name, str) or not name or not isinstance(arguments, str):
        raise TypeError("a tool call needs a function name and string arguments")
    return ToolCall(str(raw.get("id") or ""), name, arguments, str(raw.get("type") or "function"))


def _choice(raw: Any, position: int) -> Choice:
    message = raw["message"]
    if not isinstance(message, dict):
        raise TypeError("message is not an object")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise TypeError("message content is neither a string nor null")
    calls = message.get("tool_calls") or ()
    if not isinstance(calls, list | tuple):
        raise TypeError("tool_calls is not a list")
    refusal = message.get("refusal")
    return Choice(
        index=int(raw.get("index", position)),
        content=content,
        finish_reason=raw.get("finish_reason"),
        tool_calls=tuple(_tool_call(call) for call in calls),
        refusal=refusal if isinstance(refusal, str) else None,
    )


def _completion(
    body: Any, choices: tuple[Choice, ...], latency_s: float, streamed: bool
) -> Completion:
    first = choices[0]
    return Completion(
        text=first.content or "",
        model=str(body.get("model") or ""),
        usage=_usage(body.get("usage")),
        latency_s=latency_s,
        finish_reason=first.finish_reason,
        response_id=body.get("id"),
        choices=choices,
        tool_calls=first.tool_calls,
        streamed=streamed,
    )


def parse_completion(raw: bytes, latency_s: float) -> Completion:
    """The completion in a non-streaming answer's body; ``LLMMalformedResponseError``
    if it is not one (see the module doc)."""
    try:
        body = json.loads(raw)
        listed = body["choices"]
        if not isinstance(listed, list) or not listed:
            raise ValueError("choices is empty or not a list")
        choices = tuple(_choice(choice, i) for i, choice in enumerate(listed))
        return _completion(body, choices, latency_s, streamed=False)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError) as exc:
        raise _malformed("unreadable body", exc) from exc


@dataclass
class _PartialChoice:
    content: list[str] = field(default_factory=list)
    saw_content: bool = False
    finish_reason: str | None = None
    refusal: list[str] = field(default_factory=list)
    tools: dict[int, dict[str, Any]] = field(default_factory=dict)


class StreamAssembler:
    """Fold server-sent events (``feed_line``) into one ``Completion`` (``result``)."""

    def __init__(self) -> None:
        self._buffer = ""
        self._choices: dict[int, _PartialChoice] = {}
        self._head: dict[str, Any] = {}
        self.chunks = 0  # data events with a chunk in them
        self.done = False  # saw data: [DONE]

    def feed(self, text: str) -> list[str]:
        """Take decoded bytes as they come; return the content deltas they completed."""
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        deltas: list[str] = []
        for line in lines:
            delta = self.feed_line(line.rstrip("\r"))
            if delta:
                deltas.append(delta)
        return deltas

    def feed_line(self, line: str) -> str:
        """One SSE line; returns the first choice's content delta in it ("" if none)."""
        if not line.startswith("data:"):
            return ""  # blank separators, comments (": keep-alive"), event:/id: fields
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return ""
        try:
            chunk = json.loads(data)
            if not isinstance(chunk, dict):
                raise TypeError("a stream event is not a JSON object")
            if "error" in chunk:
                error = chunk["error"]
                message = error.get("message") if isinstance(error, dict) else error
                raise LLMConnectionError(
                    bounded_text(f"the provider failed mid-stream: {message}", _MAX_ERROR_TEXT)
                )
            return self._chunk(chunk)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError) as exc:
            raise _malformed("unreadable stream event", exc) from exc

    def _chunk(self, chunk: dict[str, Any]) -> str:
        self.chunks += 1
        for key in ("id", "model"):
            if chunk.get(key) and key not in self._head:
                self._head[key] = chunk[key]
        if chunk.get("usage"):
            self._head["usage"] = chunk["usage"]
        first_delta = ""
        for raw in chunk.get("choices") or ():
            index = int(raw.get("index", 0))
            partial = self._choices.setdefault(index, _PartialChoice())
            delta = raw.get("delta") or {}
            content = delta.get("content")
            if content is not None:
                if not isinstance(content, str):
                    raise TypeError("delta content is neither a string nor null")
                partial.content.append(content)
                partial.saw_content = True
                if index == 0:
                    first_delta = content
            if isinstance(delta.get("refusal"), str):
                partial.refusal.append(delta["refusal"])
            for call in delta.get("tool_calls") or ():
                slot = partial.tools.setdefault(
                    int(call.get("index", 0)), {"id": "", "name": "", "arguments": []}
                )
                slot["id"] = call.get("id") or slot["id"]
                function = call.get("function") or {}
                slot["name"] += function.get("name") or ""
                slot["arguments"].append(function.get("arguments") or "")
            if raw.get("finish_reason"):
                partial.finish_reason = raw["finish_reason"]
        return first_delta

    def result(self, latency_s: float) -> Completion:
        """The assembled completion; ``LLMConnectionError`` if the stream ended before
        every choice finished (a cut stream is a dropped connection, whatever TCP said)."""
        if self._buffer.strip():
            self.feed_line(self._buffer.strip())
            self._buffer = ""
        if not self._choices or any(p.finish_reason is None for p in self._choices.values()):
            raise LLMConnectionError(
                f"the stream ended before the answer did ({self.chunks} chunks)"
            )
        try:
            choices = tuple(
                Choice(
                    index=index,
                    content="".join(p.content) if p.saw_content else None,
                    finish_reason=p.finish_reason,
                    tool_calls=tuple(
                        _tool_call(
                            {
                                "id": slot["id"],
                                "function": {
                                    "name": slot["name"],
                                    "arguments": "".join(slot["arguments"]),
                                },
                            }
                        )
                        for _, slot in sorted(p.tools.items())
                    ),
                    refusal="".join(p.refusal) or None,
                )
                for index, p in sorted(self._choices.items())
            )
        except (KeyError, TypeError) as exc:
            raise _malformed("unreadable tool call in the stream", exc) from exc
        return _completion(self._head, choices, latency_s, streamed=True)
