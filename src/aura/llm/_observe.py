"""Each LLM call's outcome as an instrumentation event (``LLMRequestFinished``): what
``aura_llm_requests_total``, the seed's duration histogram and the token counts read."""

from __future__ import annotations

import time

from aura import events
from aura.errors import (
    LLMConnectionError,
    LLMError,
    LLMHTTPStatusError,
    LLMMalformedResponseError,
    LLMTimeoutError,
)
from aura.events import LLMOutcome, LLMRequestFinished
from aura.llm.protocol import Completion

__all__ = ["observe_failure", "observe_success"]

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
