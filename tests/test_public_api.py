"""Every public surface is what its ``__all__`` says, and nothing in it is missing."""

from __future__ import annotations

import importlib
import inspect

import pytest

PACKAGES = [
    "aura.config",
    "aura.errors",
    "aura.events",
    "aura.metrics",
    "aura.logs",
    "aura.catalog",
    "aura.db",
    "aura.llm",
    "aura.messaging",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_names_resolve(name: str) -> None:
    module = importlib.import_module(name)
    missing = [symbol for symbol in module.__all__ if not hasattr(module, symbol)]
    assert missing == []
    assert len(set(module.__all__)) == len(module.__all__)


def test_every_error_is_an_aura_error_and_drawn_in_the_tree() -> None:
    errors = importlib.import_module("aura.errors")
    for symbol in errors.__all__:
        obj = getattr(errors, symbol)
        if inspect.isclass(obj):
            assert issubclass(obj, errors.AuraError)
            assert symbol in errors.__doc__, f"{symbol} is missing from the drawn tree"


def test_the_design_documents_public_paths() -> None:
    from aura.db import DatabaseTransactionError, transactional
    from aura.llm import CircuitOpenError, LLMError, ResilientLLMClient
    from aura.messaging import (
        PoisonPillDetector,
        RetryTracker,
        resilient_task,
        route_to_dlq,
    )
    from aura.worker.celery_app import celery_app

    assert all(
        (
            DatabaseTransactionError,
            transactional,
            CircuitOpenError,
            LLMError,
            ResilientLLMClient,
            PoisonPillDetector,
            RetryTracker,
            resilient_task,
            route_to_dlq,
            celery_app,
        )
    )
    assert hasattr(ResilientLLMClient(), "http_client")
