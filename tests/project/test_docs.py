"""The documentation's Python runs as written: the README's and every docs/ page's
```python blocks, each page's in order in one namespace, in one process of their own on
embedded defaults (the in-memory broker, a SQLite file per page) with an LLM simulator
at ``LLM_BASE_URL``. Top-level ``await`` is allowed: a block's coroutine runs on an
event loop kept for its page. A block that cannot run there is fenced
```python title="not run: WHY": the site shows that title on the block, so the page says
so. docs/adoption.md has a test of its own with more checks
(tests/project/test_adoption_guide.py). The site itself is built strict by ./test."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from aura.llm import Faults, LLMSimulator

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", flags=re.M | re.S)
NOT_RUN = re.compile(r' title="not run: [^"]+"')
OWN_TEST = {"docs/adoption.md"}

_RUNNER = """
import ast, asyncio, json, os, sys, traceback

failed = []
for page, blocks in json.load(open(sys.argv[1])):
    database = os.path.join(sys.argv[2], page.replace("/", "_") + ".db")
    os.environ["DATABASE_URL"] = "sqlite+aiosqlite:///" + database
    namespace = {"__name__": "__main__"}
    loop = asyncio.new_event_loop()
    try:
        for number, source in enumerate(blocks, 1):
            code = compile(source, f"{page}, python block {number}", "exec",
                           flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            result = eval(code, namespace)
            if asyncio.iscoroutine(result):
                loop.run_until_complete(result)
    except BaseException:
        failed.append(page)
        traceback.print_exc()
    finally:
        loop.close()
print("failed:", json.dumps(failed))
"""


def pages() -> dict[str, tuple[list[str], int]]:
    """Each page with Python: its blocks to run and how many it shows but does not run."""
    found: dict[str, tuple[list[str], int]] = {}
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        name = str(path.relative_to(ROOT))
        fences = FENCE.findall(path.read_text())
        if fences and name not in OWN_TEST:
            run = [source for info, source in fences if not info]
            found[name] = (run, len(fences) - len(run))
            for info, _ in fences:  # any other info string would skip a block silently
                assert not info or NOT_RUN.fullmatch(info), f"{name}: ```python{info}"
    return found


def test_a_block_is_run_unless_its_title_says_why_not() -> None:
    shown = pages()
    assert sum(len(run) for run, _ in shown.values()) >= 5


def test_the_docs_python_runs_as_written(tmp_path: Path) -> None:
    runnable = [(name, run) for name, (run, _) in pages().items() if run]
    assert {"README.md", "docs/patterns/database.md"} <= {name for name, _ in runnable}
    (tmp_path / "pages.json").write_text(json.dumps(runnable))
    (tmp_path / "runner.py").write_text(_RUNNER)
    with LLMSimulator(Faults(latency=0.01), seed=7).running_in_thread() as simulator:
        env = {
            "PATH": "/usr/bin:/bin",
            "CELERY_BROKER_URL": "memory://localhost/",
            "LLM_BASE_URL": simulator.base_url,
            "LOG_LEVEL": "WARNING",
            "AURA_ENV_FILE": "",
        }
        runner = [sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "pages.json")]
        done = subprocess.run(
            [*runner, str(tmp_path)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip().splitlines()[-1] == "failed: []", done.stderr[-6000:]


def test_the_readmes_links_reach_their_pages_and_sections() -> None:
    """The site checks its own links (mkdocs --strict); the README is outside it."""
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#([a-z0-9-]+))?\)", readme)
    assert len(links) >= 15
    for target, anchor in links:
        assert (ROOT / target).is_file(), target
        if anchor:
            headings = re.findall(r"^#+ (.+)$", (ROOT / target).read_text(), flags=re.M)
            slugs = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}
            assert anchor in slugs, f"{target}#{anchor}"
