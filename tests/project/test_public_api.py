"""Every public surface is exactly what its ``__all__`` says, and every error is an
``AuraError``: walked over every module of the package, not a list kept by hand.

A module whose name (or a package on its path) starts with ``_`` is private: it sits
behind its package's ``__all__`` and is not checked here. Every other module declares
``__all__``; each name in it resolves, none twice; and each public class or function
the module defines itself is in it (an internal one is named ``_like_this``).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import types
import warnings
from types import ModuleType

import pytest

import aura
from aura.errors import AuraError

# A signal, not an error: it must pass every ``except Exception`` in a task (as asyncio's
# CancelledError does), so it cannot derive from AuraError.
SIGNALS = {"aura.messaging._runtime.HardTimeLimitExceeded"}
EXTRAS = ("aura.gateway", "aura.demo", "aura.chaos")  # import FastAPI, uvicorn, ...


def _modules() -> list[str]:
    names = ["aura"]
    for info in pkgutil.walk_packages(aura.__path__, "aura."):
        if ".migrations" in info.name or info.name.endswith("__main__"):
            continue
        names.append(info.name)
    return names


MODULES = _modules()
PUBLIC = [n for n in MODULES if not any(part.startswith("_") for part in n.split("."))]


def _is_class(value: object) -> bool:
    return issubclass(type(value), type)  # never touches a lazy proxy (Celery's tasks)


def _is_function(value: object) -> bool:
    return issubclass(type(value), types.FunctionType)


def _load(name: str) -> ModuleType:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Celery's deprecation notes on import
        return importlib.import_module(name)


def test_the_walk_finds_every_layer() -> None:
    assert {"aura.messaging.rules", "aura.llm.client", "aura.db.tables"} <= set(PUBLIC)
    assert {"aura.messaging._task", "aura.db._inbox"} <= set(MODULES) - set(PUBLIC)
    assert {"aura.gateway.app", "aura.catalog.pipeline", "aura.cli.dlq"} <= set(PUBLIC)
    assert {"aura.cli.tenants", "aura.catalog.workload", "aura.tenant_labels"} <= set(PUBLIC)
    assert {"aura.llm.budgets", "aura.budget_settings"} <= set(PUBLIC)
    assert "aura.llm._budget_scripts" in set(MODULES) - set(PUBLIC)


@pytest.mark.parametrize("name", PUBLIC)
def test_all_is_exactly_the_public_names(name: str) -> None:
    module = _load(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    assert len(set(exported)) == len(exported), f"{name}.__all__ names one twice"
    assert [symbol for symbol in exported if not hasattr(module, symbol)] == []
    defined_here = [
        symbol
        for symbol, value in vars(module).items()
        if not symbol.startswith("_")
        and (_is_class(value) or _is_function(value))
        and value.__module__ == name
    ]
    assert sorted(set(defined_here) - set(exported)) == [], f"{name}: public, not in __all__"


def test_every_error_is_an_aura_error_and_drawn_in_the_tree() -> None:
    outside = []
    for name in MODULES:
        for symbol, value in vars(_load(name)).items():
            if (
                _is_class(value)
                and issubclass(value, BaseException)  # type: ignore[arg-type]
                and value.__module__ == name
                and not issubclass(value, AuraError)
                and f"{name}.{symbol}" not in SIGNALS
            ):
                outside.append(f"{name}.{symbol}")
    assert outside == []
    errors = importlib.import_module("aura.errors")
    for symbol in errors.__all__:
        obj = getattr(errors, symbol)
        if inspect.isclass(obj):
            assert issubclass(obj, errors.AuraError)
            assert symbol in (errors.__doc__ or ""), f"{symbol} is missing from the drawn tree"


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
