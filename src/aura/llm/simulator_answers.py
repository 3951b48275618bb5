"""What the LLM simulator says: chat completions as an OpenAI-compatible provider writes them.

Deterministic from the request. For a product (the last user message, as JSON) the answer
is JSON with a short description and tags, so JSON mode (``response_format``) holds by
construction. The request's options are honoured the way providers honour them:

    n                       that many choices (index 0..n-1)
    max_tokens              content cut at that many tokens (words here), finish "length"
    tools, tool_choice      with tools offered (and tool_choice not "none"), the answer is
                            a call: content null, tool_calls, finish "tool_calls"; once the
                            last message is a tool result, the answer is content again
    stream (+ stream_options.include_usage)
                            the same answer as server-sent chunks (``stream_events``)
    usage                   prompt and completion tokens, counted in words
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["ANSWER_OPTIONS", "completion_for", "enrichment_for", "stream_events", "validate"]

_TAG_WORDS = 5
_RESPONSE_FORMATS = frozenset({"text", "json_object", "json_schema"})
ANSWER_OPTIONS = ("n", "max_tokens", "max_completion_tokens", "tools", "tool_choice")


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


def validate(body: Any) -> dict[str, Any]:
    """The request body, or ``ValueError`` naming what is wrong (the simulator's 400)."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        raise ValueError("a JSON object with a 'messages' list is required")
    if not body["messages"] or not all(isinstance(m, dict) for m in body["messages"]):
        raise ValueError("'messages' must be a non-empty list of objects")
    n = body.get("n", 1)
    if not isinstance(n, int) or not 1 <= n <= 16:
        raise ValueError("'n' must be a whole number from 1 to 16")
    limit = _max_tokens(body)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError("'max_tokens' must be a whole number >= 1")
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(_tool_name(t) for t in tools)):
        raise ValueError("'tools' must be a list of functions, each with a name")
    response_format = body.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict)
        or response_format.get("type") not in _RESPONSE_FORMATS
    ):
        raise ValueError("'response_format.type' must be text, json_object or json_schema")
    return body


def _max_tokens(body: dict[str, Any]) -> Any:
    return body.get("max_completion_tokens", body.get("max_tokens"))


def _tool_name(tool: Any) -> str:
    if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
        name = tool["function"].get("name")
        return name if isinstance(name, str) else ""
    return ""


def _chosen_tool(body: dict[str, Any]) -> str | None:
    tools = body.get("tools") or []
    choice = body.get("tool_choice", "auto")
    if not tools or choice == "none" or body["messages"][-1].get("role") == "tool":
        return None
    if isinstance(choice, dict):
        named = str((choice.get("function") or {}).get("name") or "")
        return named or _tool_name(tools[0])
    return _tool_name(tools[0])


def _answer(body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The first choice's message and its finish reason."""
    messages = body["messages"]
    enrichment = json.dumps(enrichment_for(messages))
    tool = _chosen_tool(body)
    if tool is not None:
        call_id = "call_" + hashlib.sha256(f"{tool}{enrichment}".encode()).hexdigest()[:12]
        call = {"id": call_id, "type": "function"}
        call["function"] = {"name": tool, "arguments": enrichment}  # type: ignore[assignment]
        return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
    words = enrichment.split(" ")
    limit = _max_tokens(body)
    if limit is not None and len(words) > limit:
        return {"role": "assistant", "content": " ".join(words[:limit])}, "length"
    return {"role": "assistant", "content": enrichment}, "stop"


def _usage(body: dict[str, Any], message: dict[str, Any], n: int) -> dict[str, int]:
    prompt = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
    said = message["content"] or json.dumps(message.get("tool_calls"))
    completion = len(said.split()) * n
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _identity(body: dict[str, Any], message: dict[str, Any]) -> dict[str, Any]:
    digest = hashlib.sha256(json.dumps(message, sort_keys=True).encode()).hexdigest()[:16]
    return {"id": f"chatcmpl-{digest}", "created": int(time.time()), "model": str(body["model"])}


def completion_for(body: dict[str, Any]) -> dict[str, Any]:
    """The non-streaming answer to a validated request (``body["model"]`` set)."""
    message, finish = _answer(body)
    n = int(body.get("n", 1))
    return {
        **_identity(body, message),
        "object": "chat.completion",
        "choices": [
            {"index": i, "message": message, "finish_reason": finish, "logprobs": None}
            for i in range(n)
        ],
        "usage": _usage(body, message, n),
    }


def stream_events(body: dict[str, Any]) -> Iterator[dict[str, Any] | None]:
    """The streamed answer as chunk objects, one SSE event each; ``None`` is ``[DONE]``."""
    message, finish = _answer(body)
    n = int(body.get("n", 1))
    head = {**_identity(body, message), "object": "chat.completion.chunk"}

    def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None) -> Any:
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
        return {**head, "choices": [choice]}

    for index in range(n):
        yield chunk(index, {"role": "assistant", "content": "" if message["content"] else None})
        if message["content"] is not None:
            words = message["content"].split(" ")
            for position, word in enumerate(words):
                piece = word if position == len(words) - 1 else word + " "
                yield chunk(index, {"content": piece})
        for call_index, call in enumerate(message.get("tool_calls") or ()):
            function = call["function"]
            opening = {"id": call["id"], "type": "function"}
            opening["function"] = {"name": function["name"], "arguments": ""}
            yield chunk(index, {"tool_calls": [{"index": call_index, **opening}]})
            arguments = function["arguments"]
            for start in range(0, len(arguments), 16):
                piece = {
                    "index": call_index,
                    "function": {"arguments": arguments[start : start + 16]},
                }
                yield chunk(index, {"tool_calls": [piece]})
        yield chunk(index, {}, finish)
    if (body.get("stream_options") or {}).get("include_usage"):
        yield {**head, "choices": [], "usage": _usage(body, message, n)}
    yield None
