"""Each LLM call's outcome as an instrumentation event (``LLMRequestFinished``): what
``aura_llm_requests_total``, the seed's duration histogram and the token counts read; and,
with tracing on, as a span (``traced_call``: ``chat {model}``, the GenAI attributes)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aura import events, tracing
from aura.errors import (
    LLMConnectionError,
    LLMError,
    LLMHTTPStatusError,
    LLMMalformedResponseError,
    LLMTimeoutError,
)
from aura.events import LLMOutcome, LLMRequestFinished
from aura.llm.protocol import Completion

__all__ = ["observe_failure", "observe_success", "traced_call"]

_OUTCOMES: tuple[tuple[type[LLMError], LLMOutcome], ...] = (
    (LLMTimeoutError, LLMOutcome.TIMEOUT),
    (LLMConnectionError, LLMOutcome.CONNECTION_ERROR),
    (LLMHTTPStatusError, LLMOutcome.HTTP_ERROR),
    (LLMMalformedResponseError, LLMOutcome.MALFORMED),
)


def observe_failure(error: LLMError, started: float, model: str) -> None:
    """A call to ``model`` begun at ``started`` (``time.perf_counter``) failed."""
    outcome = next(o for kind, o in _OUTCOMES if isinstance(error, kind))
    events.emit(LLMRequestFinished(outcome, time.perf_counter() - started, model))


def observe_success(completion: Completion, started: float, model: str) -> None:
    """A call to ``model`` begun at ``started`` answered, with the usage it reported."""
    usage = completion.usage
    events.emit(
        LLMRequestFinished(
            LLMOutcome.SUCCESS,
            time.perf_counter() - started,
            model,
            usage.prompt_tokens,
            usage.completion_tokens,
        )
    )


async def traced_call(
    call: Callable[[], Awaitable[Completion]],
    model: str,
    provider: str,
    base_url: str,
    messages: object,
) -> Completion:
    """``call()`` (one model's guarded call) in its ``chat {model}`` span: the answer's
    model, id, finish reason and token counts on it, or the error's type (a breaker's
    refusal, ``CircuitOpenError``, included). Only when tracing is on."""
    split = urlsplit(base_url)
    try:
        server = (split.hostname or "", split.port)
    except ValueError:  # a port that is no number: the call itself will say so
        server = (split.hostname or "", None)
    with tracing.llm_span(model, provider, messages, server) as span:
        completion = await call()
        span.answered(
            model=completion.model,
            response_id=completion.response_id,
            finish_reason=completion.finish_reason,
            input_tokens=completion.usage.prompt_tokens,
            output_tokens=completion.usage.completion_tokens,
            text=completion.text,
        )
    return completion
