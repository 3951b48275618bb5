"""The LLM layer (seed pattern 2): timeouts, deadlines and fleet-wide breakers per model.

ResilientLLMClient   chat completions, streamed or not; ``http_client`` (httpx) and
                     ``circuit_breaker`` (the default model's), ``breaker_for(model)``;
                     ``from_settings(settings, redis=..., ...)``, or its parts:
Provider             one API's wire format (``OpenAIProvider``, ``AnthropicProvider``;
                     ``PROVIDERS`` by ``LLM_PROVIDER`` name); builds a ``ProviderRequest``
Wire                 how requests go out (``AiohttpWire``, the default; ``HttpxWire``)
CallPolicy           the model, deadlines, ``BreakerPolicy`` and ``LimitPolicy``
Completion           the answer: text, choices, tool calls, finish reason, usage, model
CircuitBreaker       asyncio breaker, shared by every process on one Redis
RateLimiter          fleet-wide requests/tokens per minute (GCRA in Redis, one round trip)
TenantBudgets        each tenant's tokens per minute and per day, fleet-wide (``usage``)
LLMSimulator         the OpenAI-compatible stand-in with fault injection (``Faults``)
"""

from aura.errors import (
    CircuitOpenError,
    LLMBudgetExceededError,
    LLMConnectionError,
    LLMError,
    LLMHTTPStatusError,
    LLMMalformedResponseError,
    LLMTimeoutError,
)
from aura.llm._anthropic import AnthropicProvider
from aura.llm._openai import OpenAIProvider
from aura.llm._policy import BreakerPolicy, CallPolicy, LimitPolicy
from aura.llm._provider import HoldOff, Provider, ProviderRequest, StreamParser
from aura.llm._providers import PROVIDERS
from aura.llm._wire import AiohttpWire, HttpxWire, Wire
from aura.llm.breaker import BreakerRecord, CircuitBreaker, transition
from aura.llm.budgets import TenantBudgets, TenantUsage, TokenBudget
from aura.llm.client import (
    DEFAULT_SIMULATOR_URL,
    MAX_BREAKERS,
    ResilientLLMClient,
    provider_of,
    trips_breaker,
)
from aura.llm.protocol import Choice, Completion, StreamAssembler, ToolCall, Usage
from aura.llm.ratelimit import LLMRateLimitedError, RateLimit, RateLimiter, estimate_tokens
from aura.llm.simulator import Faults, LLMSimulator, enrichment_for

__all__ = [
    "DEFAULT_SIMULATOR_URL",
    "MAX_BREAKERS",
    "PROVIDERS",
    "AiohttpWire",
    "AnthropicProvider",
    "BreakerPolicy",
    "BreakerRecord",
    "CallPolicy",
    "Choice",
    "CircuitBreaker",
    "CircuitOpenError",
    "Completion",
    "Faults",
    "HoldOff",
    "HttpxWire",
    "LLMBudgetExceededError",
    "LLMConnectionError",
    "LLMError",
    "LLMHTTPStatusError",
    "LLMMalformedResponseError",
    "LLMRateLimitedError",
    "LLMSimulator",
    "LLMTimeoutError",
    "LimitPolicy",
    "OpenAIProvider",
    "Provider",
    "ProviderRequest",
    "RateLimit",
    "RateLimiter",
    "ResilientLLMClient",
    "StreamAssembler",
    "StreamParser",
    "TenantBudgets",
    "TenantUsage",
    "TokenBudget",
    "ToolCall",
    "Usage",
    "Wire",
    "enrichment_for",
    "estimate_tokens",
    "provider_of",
    "transition",
    "trips_breaker",
]
