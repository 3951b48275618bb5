"""The providers ``LLM_PROVIDER`` can name: one line each (see ``aura.llm._provider``).

A factory takes the base URL and the API key. A provider not listed here still works:
hand an instance to ``ResilientLLMClient`` (or ``from_settings(provider=...)``).
"""

from __future__ import annotations

from collections.abc import Callable

from aura.llm._anthropic import AnthropicProvider
from aura.llm._openai import OpenAIProvider
from aura.llm._provider import Provider

__all__ = ["PROVIDERS"]

PROVIDERS: dict[str, Callable[[str, str], Provider]] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
}
