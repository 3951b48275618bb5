"""The LLM layer (seed pattern 2): timeouts, an overall deadline and a fleet-wide breaker.

ResilientLLMClient   chat completions; ``http_client`` (httpx) and ``circuit_breaker``
CircuitBreaker       asyncio breaker, shared by every process on one Redis
LLMSimulator         the OpenAI-compatible stand-in with fault injection (``Faults``)
"""

from aura.errors import (
    CircuitOpenError,
    LLMConnectionError,
    LLMError,
    LLMHTTPStatusError,
    LLMMalformedResponseError,
    LLMTimeoutError,
)
from aura.llm.breaker import BreakerRecord, CircuitBreaker, transition
from aura.llm.client import (
    DEFAULT_SIMULATOR_URL,
    Completion,
    ResilientLLMClient,
    Usage,
    trips_breaker,
)
from aura.llm.simulator import Faults, LLMSimulator, enrichment_for

__all__ = [
    "DEFAULT_SIMULATOR_URL",
    "BreakerRecord",
    "CircuitBreaker",
    "CircuitOpenError",
    "Completion",
    "Faults",
    "LLMConnectionError",
    "LLMError",
    "LLMHTTPStatusError",
    "LLMMalformedResponseError",
    "LLMSimulator",
    "LLMTimeoutError",
    "ResilientLLMClient",
    "Usage",
    "enrichment_for",
    "transition",
    "trips_breaker",
]
