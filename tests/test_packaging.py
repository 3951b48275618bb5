"""The core install stands alone: core modules import no extra at import time, and the
layers point one way (messaging knows nothing of the worker or the gateway; the worker
nothing of the gateway)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "aura"
EXTRAS = ["fastapi", "starlette", "uvicorn", "fakeredis", "aiosqlite"]
CORE = [
    "aura",
    "aura.config",
    "aura.contract",
    "aura.errors",
    "aura.events",
    "aura.logs",
    "aura.metrics",
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


def _imports(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((SRC / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        found[str(path.relative_to(SRC))] = names
    return found


def _reaching(package: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    return {
        path: sorted(n for n in names if n.startswith(forbidden))
        for path, names in _imports(package).items()
        if any(n.startswith(forbidden) for n in names)
    }


def test_messaging_imports_neither_the_worker_nor_the_gateway() -> None:
    assert _reaching("messaging", ("aura.worker", "aura.gateway", "aura.demo")) == {}


def test_the_worker_does_not_import_the_gateway() -> None:
    assert _reaching("worker", ("aura.gateway", "aura.demo")) == {}
