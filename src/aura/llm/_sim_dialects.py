"""The simulator's dialects: the one answer (``simulator_answers``) in each API's shape.

A dialect reads its API's request into the chat request the answers are made from, and
writes the answer, its stream, its errors and its rate-limit headers back in its own
shape. The faults are the simulator's, the same for every dialect.

    dialect    route                   auth            errors
    ---------  ----------------------  --------------  --------------------------------
    chat       POST /v1/chat/completions  Bearer key   {"error": {message, type, code}}
    messages   POST /v1/messages       x-api-key       {"type": "error", "error": {...}}
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from aura.llm.simulator_answers import completion_for, stream_events, validate

__all__ = ["CHAT", "DIALECTS", "MESSAGES", "ChatDialect", "MessagesDialect"]

Headers = list[tuple[str, str]]


class ChatDialect:
    """OpenAI-compatible chat completions."""

    name = "chat"
    malformed_body = b'{"choices": [{"mess'
    broken_event = b'data: {"choices": [{"del\n\n'

    def authorized(self, headers: dict[bytes, bytes], key: str) -> bool:
        return headers.get(b"authorization", b"").decode() == f"Bearer {key}"

    def chat_request(self, parsed: Any) -> dict[str, Any]:
        """The request as a chat request, or ``ValueError`` (the simulator's 400)."""
        return validate(parsed)

    def answer(self, completion: dict[str, Any]) -> dict[str, Any]:
        """The answer to send, from the chat completion ``completion_for`` made."""
        return completion

    def events(self, body: dict[str, Any]) -> list[bytes]:
        return [
            b"data: [DONE]\n\n" if chunk is None else _data(chunk) for chunk in stream_events(body)
        ]

    def failure_event(self) -> bytes:
        return _data({"error": {"message": "simulated failure mid-stream", "type": "server_error"}})

    def error(self, status: int, message: str) -> dict[str, Any]:
        return {"error": {"message": message, "type": "simulated", "code": status}}

    def rate_headers(self, headers: Headers) -> Headers:
        return headers


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


class MessagesDialect:
    """The Anthropic Messages API (``aura.llm._anthropic`` is its client side)."""

    name = "messages"
    malformed_body = b'{"content": [{"ty'
    broken_event = b'event: content_block_delta\ndata: {"type": "content_bl\n\n'

    def authorized(self, headers: dict[bytes, bytes], key: str) -> bool:
        return headers.get(b"x-api-key", b"").decode() == key

    def chat_request(self, parsed: Any) -> dict[str, Any]:
        if not isinstance(parsed, dict) or not isinstance(parsed.get("messages"), list):
            raise ValueError("a JSON object with a 'messages' list is required")
        limit = parsed.get("max_tokens")
        if not isinstance(limit, int) or limit < 1:
            raise ValueError("max_tokens: a whole number >= 1 is required")
        system = parsed.get("system")
        if system is not None and not isinstance(system, str):
            raise ValueError("system: a string")
        messages = [{"role": "system", "content": system}] if system else []
        chat = {**parsed, "messages": [*messages, *parsed["messages"]]}
        chat.pop("system", None)
        return validate(chat)

    def answer(self, completion: dict[str, Any]) -> dict[str, Any]:
        choice = completion["choices"][0]
        message = choice["message"]
        blocks: list[dict[str, Any]] = []
        if message["content"] is not None:
            blocks.append({"type": "text", "text": message["content"]})
        for call in message.get("tool_calls") or ():
            function = call["function"]
            arguments = json.loads(function["arguments"] or "{}")
            blocks.append(
                {"type": "tool_use", "id": call["id"], "name": function["name"], "input": arguments}
            )
        return {
            "id": completion["id"].replace("chatcmpl-", "msg_"),
            "type": "message",
            "role": "assistant",
            "model": completion["model"],
            "content": blocks,
            "stop_reason": _STOP_REASONS.get(choice["finish_reason"], "end_turn"),
            "stop_sequence": None,
            "usage": {
                "input_tokens": completion["usage"]["prompt_tokens"],
                "output_tokens": completion["usage"]["completion_tokens"],
            },
        }

    def events(self, body: dict[str, Any]) -> list[bytes]:
        message = self.answer(completion_for(body))
        start = {**message, "content": [], "stop_reason": None}
        start["usage"] = {**message["usage"], "output_tokens": 0}
        events = [_event("message_start", {"message": start})]
        for index, block in enumerate(message["content"]):
            events += _block_events(index, block)
        delta = {"stop_reason": message["stop_reason"], "stop_sequence": None}
        usage = {"output_tokens": message["usage"]["output_tokens"]}
        events.append(_event("message_delta", {"delta": delta, "usage": usage}))
        events.append(_event("message_stop", {}))
        return events

    def failure_event(self) -> bytes:
        error = {"type": "overloaded_error", "message": "simulated failure mid-stream"}
        return _event("error", {"error": error})

    def error(self, status: int, message: str) -> dict[str, Any]:
        kind = _ERROR_TYPES.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}

    def rate_headers(self, headers: Headers) -> Headers:
        """x-ratelimit-{limit,remaining,reset}-KIND as anthropic-ratelimit-KIND-*, the
        reset as an RFC 3339 time."""
        renamed: Headers = []
        for name, value in headers:
            if not name.startswith("x-ratelimit-"):
                renamed.append((name, value))
                continue
            field, kind = name.removeprefix("x-ratelimit-").split("-", 1)
            if field == "reset":
                at = time.time() + float(value.removesuffix("s"))
                value = datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")
            renamed.append((f"anthropic-ratelimit-{kind}-{field}", value))
        return renamed


def _block_events(index: int, block: dict[str, Any]) -> list[bytes]:
    if block["type"] == "text":
        words = block["text"].split(" ")
        pieces = [word if i == len(words) - 1 else word + " " for i, word in enumerate(words)]
        opening: dict[str, Any] = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": piece} for piece in pieces]
    else:
        opening = {**block, "input": {}}
        arguments = json.dumps(block["input"])
        deltas = [
            {"type": "input_json_delta", "partial_json": arguments[at : at + 16]}
            for at in range(0, len(arguments), 16)
        ]
    return [
        _event("content_block_start", {"index": index, "content_block": opening}),
        *(_event("content_block_delta", {"index": index, "delta": d}) for d in deltas),
        _event("content_block_stop", {"index": index}),
    ]


def _data(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _event(kind: str, payload: dict[str, Any]) -> bytes:
    return f"event: {kind}\n".encode() + _data({"type": kind, **payload})


CHAT, MESSAGES = ChatDialect(), MessagesDialect()
# by route (with and without the /v1 prefix)
DIALECTS: dict[str, ChatDialect | MessagesDialect] = {
    "/v1/chat/completions": CHAT,
    "/chat/completions": CHAT,
    "/v1/messages": MESSAGES,
    "/messages": MESSAGES,
}
