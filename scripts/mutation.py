#!/usr/bin/env python3
"""Mutation testing of the pattern modules, on demand (slow: not part of ./test or CI).

    .venv/bin/python scripts/mutation.py                       # all eight modules
    .venv/bin/python scripts/mutation.py messaging/retry.py    # some of them
    .venv/bin/python scripts/mutation.py --list db/inbox.py    # the mutants, not run
    .venv/bin/python scripts/mutation.py --jobs 2 --line 60    # mutants on line 60 only

One mutant at a time: a comparison flipped (< >=, == !=, is / is not, in / not in), a
number changed (n -> n + 1; 0 <-> 1; True <-> False), ``and`` <-> ``or``, ``not`` dropped,
``+`` <-> ``-``, a call statement deleted, a returned value replaced by None. Each mutant
runs the module's own test files (``TESTS`` below) with ``-x -p no:cacheprovider`` and a
timeout (a mutant that hangs counts as killed). The mutants run in a temporary copy of
the tree (src and tests; a mutant on a line the tests never run (traced in the tests'
own process) survives without a run; each write of the mutated file gets an mtime of its own, so
no cached bytecode outlives it), so the working tree is never touched, even on
Ctrl-C. Equivalent mutants are listed, with the reason, in scripts/mutation_equivalent.txt
(``module: line's text  =>  mutated line's text  # reason``) and excluded from the score.

Why our own mutator and not mutmut or cosmic-ray: the suite runs real services and
starts Celery workers and CLI processes as subprocesses (``sys.executable -m ...``);
mutmut 3 swaps code in through trampolines in a ``mutants/`` copy that those processes do
not import, and cosmic-ray needs a session database and config per module. A mutant here
is the real module source with one node replaced, so every process the tests start
imports it through ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import dataclasses
import importlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "aura"
EQUIVALENT = ROOT / "scripts" / "mutation_equivalent.txt"

# The module's own test files: what a developer runs after touching it (the pinning
# tests first: with -x a mutant they kill costs only them).
TESTS: dict[str, list[str]] = {
    "db/transactional.py": ["tests/db/test_transactional_edges.py", "tests/db/test_db.py"],
    "db/inbox.py": ["tests/db/test_inbox_edges.py", "tests/db/test_db.py"],
    "llm/breaker.py": ["tests/llm/test_breaker_edges.py", "tests/llm/test_breaker.py"],
    "llm/_breaker_state.py": ["tests/llm/test_breaker_edges.py", "tests/llm/test_breaker.py"],
    "llm/client.py": [
        "tests/llm/test_client_edges.py",
        "tests/llm/test_client.py",
        "tests/llm/test_ratelimit.py",
    ],
    "messaging/poison.py": ["tests/messaging/test_poison_edges.py", "tests/messaging/test_poison.py"],
    "messaging/retry.py": ["tests/messaging/test_retry_edges.py", "tests/messaging/test_messaging_units.py"],
    "messaging/dlq.py": [
        "tests/messaging/test_dlq_edges.py",
        "tests/messaging/test_dlq_reader.py",
        "tests/messaging/test_messaging_units.py",
    ],
    # test_worker.py drives task.py through real Celery workers (about a minute a run):
    # too slow per mutant; the in-process tests run instead.
    "messaging/task.py": ["tests/messaging/test_task_edges.py", "tests/messaging/test_messaging_units.py"],
}

_FLIP: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.GtE,
    ast.GtE: ast.Lt,
    ast.Gt: ast.LtE,
    ast.LtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}


@dataclasses.dataclass(frozen=True)
class Mutant:
    module: str
    line: int
    kind: str
    start: tuple[int, int]  # (line, col) of the replaced segment, 1-based line
    end: tuple[int, int]
    replacement: str

    def apply(self, source: str) -> str:
        lines = source.splitlines(keepends=True)
        offsets = [0]
        for text in lines:
            offsets.append(offsets[-1] + len(text.encode()))
        data = source.encode()
        a = offsets[self.start[0] - 1] + self.start[1]
        b = offsets[self.end[0] - 1] + self.end[1]
        return (data[:a] + self.replacement.encode() + data[b:]).decode()

    def diff(self, source: str) -> tuple[str, str]:
        before = source.splitlines()[self.line - 1].strip()
        after = self.apply(source).splitlines()[self.line - 1].strip()
        return before, after


def _skipped_nodes(tree: ast.AST) -> set[int]:
    """Docstrings, annotations, ``__all__``, ``assert``s and ``@overload`` stubs are not
    mutated."""
    skip: set[int] = set()

    def mark(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                mark(body[0])
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and any(
            (isinstance(d, ast.Name) and d.id == "overload")
            or (isinstance(d, ast.Attribute) and d.attr == "overload")
            for d in node.decorator_list
        ):
            mark(node)  # a typing stub: replaced by the real definition at import
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            mark(node.returns)
            for arg in [*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs]:
                mark(arg.annotation)
            mark(node.args.vararg and node.args.vararg.annotation)
            mark(node.args.kwarg and node.args.kwarg.annotation)
        if isinstance(node, ast.AnnAssign):
            mark(node.annotation)
        if isinstance(node, ast.Assert):
            mark(node)
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            mark(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            mark(node)
    return skip


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _is_text(node: ast.expr) -> bool:
    return isinstance(node, ast.JoinedStr) or (
        isinstance(node, ast.Constant) and isinstance(node.value, str | bytes)
    )


def _is_none(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


def _replacements(node: ast.AST) -> Iterator[tuple[str, str]]:
    """(kind, new source of ``node``) for each mutant of this one node."""
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            flipped = _FLIP.get(type(op))
            if flipped is not None:
                new = copy.deepcopy(node)
                new.ops[i] = flipped()
                yield "comparison", ast.unparse(new)
    elif isinstance(node, ast.BoolOp):
        new = copy.deepcopy(node)
        new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        yield "and/or", ast.unparse(new)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        yield "not dropped", f"({ast.unparse(node.operand)})"
    elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub):
        if not (_is_text(node.left) or _is_text(node.right)):
            new = copy.deepcopy(node)
            new.op = ast.Sub() if isinstance(node.op, ast.Add) else ast.Add()
            yield "arithmetic", ast.unparse(new)
    elif isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool):
            yield "constant", repr(not value)
        elif isinstance(value, int):
            yield "constant", repr({0: 1, 1: 0}.get(value, value + 1))
        elif isinstance(value, float):
            yield "constant", repr(value + 1.0)
    elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call | ast.Await):
        yield "call deleted", "pass"
    elif isinstance(node, ast.Return) and node.value is not None and not _is_none(node.value):
        yield "return None", "return None"


def mutants(module: str) -> list[Mutant]:
    source = (PACKAGE / module).read_text()
    tree = ast.parse(source)
    skip = _skipped_nodes(tree)
    lines = source.splitlines()
    found: list[Mutant] = []
    for node in ast.walk(tree):
        if id(node) in skip or not hasattr(node, "lineno"):
            continue
        if "pragma: no mutate" in lines[node.lineno - 1]:
            continue
        for kind, replacement in _replacements(node):
            found.append(
                Mutant(
                    module,
                    node.lineno,
                    kind,
                    (node.lineno, node.col_offset),
                    (node.end_lineno or node.lineno, node.end_col_offset or 0),
                    replacement,
                )
            )
    found.sort(key=lambda m: (m.start, m.end, m.replacement))
    return found


def equivalents() -> dict[tuple[str, str, str], str]:
    """(module, line's text, mutated line's text) -> reason, from mutation_equivalent.txt."""
    listed: dict[tuple[str, str, str], str] = {}
    if not EQUIVALENT.exists():
        return listed
    for raw in EQUIVALENT.read_text().splitlines():
        if not raw.strip() or raw.startswith("#"):
            continue
        match = re.match(r"(\S+): (.*?)  =>  (.*)  # (.*)$", raw)  # the last "  # " ends it
        if match is None:
            sys.exit(f"{EQUIVALENT}: cannot read {raw!r}")
        module, before, after, reason = match.groups()
        listed[(module, before.strip(), after.strip())] = reason
    return listed


def _copy_tree(into: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".mypy_cache", ".ruff_cache")
    for part in ("src", "tests", "pyproject.toml", "scripts", "deploy", "bench"):
        origin = ROOT / part
        if origin.is_dir():
            shutil.copytree(origin, into / part, ignore=ignore)
        elif origin.exists():
            shutil.copy2(origin, into / part)


def _environment(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree / "src"), str(tree)])
    env.pop("AURA_MUTATION_DEBUG", None)
    return env


_BASELINE = False  # --baseline: the suite's own test files, without tests/test_pins_*


# Imported once in this process, before any fork, so that a mutant's pytest starts in a
# fraction of a second; never anything of aura or tests (those are the mutant's own).
_PRELOAD = (
    "pytest",
    "hypothesis",
    "sqlalchemy.ext.asyncio",
    "sqlalchemy.dialects.postgresql",
    "sqlalchemy.dialects.sqlite",
    "asyncpg",
    "aiosqlite",
    "alembic.command",
    "redis.asyncio",
    "celery",
    "kombu",
    "amqp",
    "pydantic",
    "structlog",
    "httpx",
    "aiohttp",
    "prometheus_client",
    "fastapi",
    "greenlet",
)


def _preload(tree: Path) -> None:
    """The third-party libraries, then every aura module of ``tree`` (a mutant's child
    drops the mutated module and what imports it, see ``_dependents``)."""
    for name in _PRELOAD:
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    sys.path.insert(0, str(tree / "src"))
    for name in sorted(_module_files(tree)):
        if not name.endswith("__main__"):
            with contextlib.suppress(Exception):
                importlib.import_module(name)


def _module_files(tree: Path) -> dict[str, Path]:
    found = {}
    for path in (tree / "src" / "aura").rglob("*.py"):
        parts = path.relative_to(tree / "src").with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _dependents(tree: Path, module: str) -> set[str]:
    """``module`` and every aura module that imports it, directly or not (any import
    statement, at any depth; a module also needs its parent packages)."""
    files = _module_files(tree)
    edges: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        parent = name.rpartition(".")[0]
        if parent in files:
            edges[name].add(parent)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges[name].update(a.name for a in node.names if a.name in files)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module in files:
                    edges[name].add(node.module)
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in files:
                        edges[name].add(f"{node.module}.{alias.name}")
    found = {module}
    changed = True
    while changed:
        changed = False
        for name, targets in edges.items():
            if name not in found and targets & found:
                found.add(name)
                changed = True
    return found


def _pytest(
    tree: Path,
    tests: list[str],
    timeout: float,
    stale: set[str],
    trace: tuple[Path, Path] | None = None,
) -> tuple[str, float]:
    """'passed', 'failed' or 'timeout', and the seconds it took: pytest in a forked
    child (the heavy imports already done), in its own session so that a timeout kills
    it and everything it started. ``trace`` (source, output): write the lines of
    ``source`` the run executed (in this process's threads) to ``output`` as JSON."""
    arguments = ["-x", "-q", "-p", "no:cacheprovider", "--timeout", "60", *tests]
    arguments += ["-W", "ignore::pytest.PytestAssertRewriteWarning"]  # preloaded modules
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 99
        try:
            quiet = not os.environ.get("AURA_MUTATION_DEBUG")
            os.setsid()
            os.chdir(tree)
            for name in stale:  # imported afresh, from the mutant's source
                sys.modules.pop(name, None)
            os.environ.clear()
            os.environ.update(_environment(tree))
            sys.path[:0] = [str(tree / "src"), str(tree)]
            if quiet:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
            import pytest

            executed: set[int] = set()
            if trace is not None:
                _trace_lines(str(trace[0]), executed)
            code = int(pytest.main(arguments))
            if trace is not None:
                sys.settrace(None)
                trace[1].write_text(json.dumps(sorted(executed)))
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                return ("passed" if code == 0 else "failed"), time.monotonic() - started
            if time.monotonic() - started > timeout:
                _kill(pid)
                return "timeout", time.monotonic() - started
            time.sleep(0.05)
    except BaseException:
        _kill(pid)
        raise


def _trace_lines(filename: str, executed: set[int]) -> None:
    """Record the lines of ``filename`` run from now on, in this thread and new ones."""

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            executed.add(frame.f_lineno)
        return local

    def calls(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename == filename:
            executed.add(frame.f_lineno)
            return local
        return None

    threading.settrace(calls)
    sys.settrace(calls)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


_STAMPS = iter(range(1_000_000_000, 2_000_000_000))


def _write(path: Path, text: str) -> None:
    """Write ``text`` with an mtime no write had before: a cached .pyc (keyed by mtime
    in seconds and size) can never stand in for another mutant's source."""
    path.write_text(text)
    stamp = next(_STAMPS)
    os.utime(path, (stamp, stamp))


@dataclasses.dataclass
class Score:
    module: str
    mutants: int = 0
    killed: int = 0
    survived: list[tuple[Mutant, str, str]] = dataclasses.field(default_factory=list)
    equivalent: list[tuple[Mutant, str]] = dataclasses.field(default_factory=list)

    @property
    def score(self) -> float:
        counted = self.mutants - len(self.equivalent)
        return 100.0 * self.killed / counted if counted else 100.0


def run_module(module: str, tree: Path, args: argparse.Namespace) -> Score:
    target = tree / "src" / "aura" / module
    original = target.read_text()
    tests = [
        t
        for t in TESTS[module]
        if (tree / t).exists() and not (_BASELINE and Path(t).name.startswith("test_pins_"))
    ]
    listed = equivalents()
    score = Score(module)
    chosen = [m for m in mutants(module) if args.line is None or m.line in args.line]
    chosen = chosen[:: args.sample]
    stale = _dependents(tree, "aura." + module.removesuffix(".py").replace("/", "."))
    lines_file = tree / "executed-lines.json"
    lines_file.unlink(missing_ok=True)
    outcome, baseline = _pytest(tree, tests, 1200, stale, (target, lines_file))
    if outcome != "passed" or not lines_file.exists():
        sys.exit(f"{module}: the tests fail without a mutant ({' '.join(tests)})")
    executed = set(json.loads(lines_file.read_text()))
    outcome, baseline = _pytest(tree, tests, 1200, stale)  # timed without the tracer
    timeout = max(3 * baseline, baseline + 20)
    print(f"== {module}: {len(chosen)} mutants; tests {baseline:.1f} s, timeout {timeout:.0f} s")
    try:
        for number, mutant in enumerate(chosen, 1):
            before, after = mutant.diff(original)
            score.mutants += 1
            reason = listed.get((module, before, after))
            if executed.isdisjoint(range(mutant.start[0], mutant.end[0] + 1)):
                result, took = "passed", 0.0  # no test runs the line: nothing can fail
            else:
                _write(target, mutant.apply(original))
                result, took = _pytest(tree, tests, timeout, stale)
                _write(target, original)
            if result == "passed":
                if reason is not None:
                    score.equivalent.append((mutant, reason))
                else:
                    score.survived.append((mutant, before, after))
            else:
                score.killed += 1
            if args.verbose:
                print(
                    f"  [{number}/{len(chosen)}] {module}:{mutant.line} {result} ({took:.1f} s)",
                    flush=True,
                )
                print(f"      - {before}\n      + {after}")
    finally:
        _write(target, original)
    _print(score, original)
    return score


def _print(score: Score, source: str) -> None:
    print(
        f"{score.module}: mutants {score.mutants}, killed {score.killed}, "
        f"survived {len(score.survived)}, equivalent {len(score.equivalent)}, "
        f"score {score.score:.0f} %"
    )
    for mutant, before, after in score.survived:
        print(f"  SURVIVED {score.module}:{mutant.line} ({mutant.kind})")
        print(f"      - {before}\n      + {after}")
    sys.stdout.flush()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", default=list(TESTS), help="e.g. messaging/retry.py")
    parser.add_argument("--list", action="store_true", help="print the mutants, run nothing")
    parser.add_argument("--line", type=int, action="append", help="only mutants on this line")
    parser.add_argument(
        "--baseline", action="store_true", help="without tests/test_pins_* (the 'before')"
    )
    parser.add_argument(
        "--sample", type=int, default=1, help="every Nth mutant only (an estimate, faster)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per mutant")
    args = parser.parse_args()
    global _BASELINE
    _BASELINE = args.baseline
    for module in args.modules:
        if module not in TESTS:
            sys.exit(f"unknown module {module!r}; one of {', '.join(TESTS)}")
    if args.list:
        for module in args.modules:
            source = (PACKAGE / module).read_text()
            for mutant in mutants(module):
                before, after = mutant.diff(source)
                print(f"{module}:{mutant.line} ({mutant.kind})\n    - {before}\n    + {after}")
        return
    # Ctrl-C, or a kill: stop the running mutant and remove the copy. (A background job of
    # a non-interactive shell starts with SIGINT ignored: restore it.)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    scores = []
    with tempfile.TemporaryDirectory(prefix="aura-mutation-") as scratch:
        tree = Path(scratch)
        _copy_tree(tree)
        _preload(tree)
        try:
            for module in args.modules:
                scores.append(run_module(module, tree, args))
        except KeyboardInterrupt:
            print("interrupted; the working tree was never changed")
            raise SystemExit(130) from None
    print("\n| module | mutants | killed | survived | equivalent | score |")
    print("|---|---|---|---|---|---|")
    for s in scores:
        print(
            f"| `{s.module}` | {s.mutants} | {s.killed} | {len(s.survived)} | "
            f"{len(s.equivalent)} | {s.score:.0f} % |"
        )
    for s in scores:
        for mutant, reason in s.equivalent:
            print(f"equivalent {s.module}:{mutant.line}: {reason}")


if __name__ == "__main__":
    main()
