"""The core install stands alone: core modules import no extra at import time, and the
layers point one way (foundation < patterns < platform < tools: ``LAYERS``)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "aura"
EXTRAS = ["fastapi", "starlette", "uvicorn", "fakeredis", "aiosqlite", "opentelemetry"]
CORE = [
    "aura",
    "aura.config",
    "aura.contract",
    "aura.errors",
    "aura.events",
    "aura.logs",
    "aura.metrics",
    "aura.tracing",
    "aura.catalog",
    "aura.db",
    "aura.db.tables",
    "aura.llm",
    "aura.messaging",
    *(f"aura.messaging.{p.stem}" for p in sorted((SRC / "messaging").glob("[!_]*.py"))),
    "aura.worker.celery_app",
    "aura.worker.tasks",
    "aura.cli",
    *(f"aura.cli.{p.stem}" for p in sorted((SRC / "cli").glob("[!_]*.py"))),
]

_PROBE = """
import importlib, importlib.abc, json, sys
blocked = set(json.loads(sys.argv[1]))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{name} is an extra")
sys.meta_path.insert(0, Block())
failed = {}
for module in json.loads(sys.argv[2]):
    try:
        importlib.import_module(module)
    except ImportError as exc:
        failed[module] = str(exc)
print(json.dumps(failed))
"""


def test_core_modules_import_without_the_extras() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(EXTRAS), json.dumps(CORE)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {}


# The layers, lowest first: a module imports only from its own layer or a lower one (STYLE.md,
# "Layers point one way"), even lazily inside a function or under TYPE_CHECKING, so the
# patterns work in someone else's Celery app without the platform.
LAYERS: dict[str, tuple[str, ...]] = {
    "foundation": (
        "backoff",
        "budget_settings",
        "config",
        "contract",
        "errors",
        "events",
        "logs",
        "message_id",
        "metrics",
        "process_args",
        "redis_connect",
        "redis_errors",
        "tenancy",
        "tenant_labels",
        "tracing",
    ),
    "patterns": ("db", "llm", "messaging"),
    "platform": ("catalog", "gateway", "worker"),
    "tools": ("chaos", "cli", "demo", "timeline"),
}
ENTRY_POINTS = ("aura", "aura.__main__")  # above every layer; the package is importable by all
_RANK = {top: rank for rank, tops in enumerate(LAYERS.values()) for top in tops}
_LAYER_OF_RANK = list(LAYERS)


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _every_import(path: Path) -> set[str]:
    """Every aura module ``path`` imports anywhere in it (``from aura import events`` is
    ``aura.events``; ``from aura import __version__`` is the package ``aura``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: a relative import"
            if node.module == "aura":
                names.update(
                    f"aura.{a.name}"
                    if (SRC / a.name).exists() or (SRC / f"{a.name}.py").exists()
                    else "aura"
                    for a in node.names
                )
            else:
                names.add(node.module)
    return {n for n in names if n == "aura" or n.startswith("aura.")}


def _rank(module: str) -> int | None:
    """The module's layer (its index in LAYERS); None for an entry point."""
    if module in ENTRY_POINTS:
        return None
    top = module.split(".")[1]
    assert top in _RANK, f"{module} is in no layer: add it to LAYERS"
    return _RANK[top]


def test_every_module_is_in_a_layer() -> None:
    for path in SRC.rglob("*.py"):
        _rank(_module_name(path))


def test_no_import_reaches_up_a_layer() -> None:
    upward: dict[str, list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        module = _module_name(path)
        rank = _rank(module)
        if rank is None:
            continue
        for name in sorted(_every_import(path)):
            imported = None if name == "aura" else _rank(name)
            if imported is not None and imported > rank:
                upward.setdefault(f"{module} ({_LAYER_OF_RANK[rank]})", []).append(
                    f"{name} ({_LAYER_OF_RANK[imported]})"
                )
    assert upward == {}


def test_the_layering_walk_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    module = tmp_path / "probe.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from aura.gateway import Gateway\n"
        "def f():\n    import aura.cli\n    from aura import events, __version__\n"
    )
    assert _every_import(module) == {"aura", "aura.cli", "aura.events", "aura.gateway"}


def test_the_gateway_and_the_worker_do_not_import_each_other() -> None:
    """They share only ``aura.contract`` (task names, queues, argument order)."""
    for package, other in (("gateway", "aura.worker"), ("worker", "aura.gateway")):
        for path in (SRC / package).rglob("*.py"):
            assert not {n for n in _every_import(path) if n.startswith(other)}, path
