"""The ``aura`` command starts cheaply and reads well: what ``--help`` loads, labels,
``--version``, ``-h``, completion, the log format. (Speed itself is measured by
``bench/cli_startup.py``, never asserted here.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from aura import __version__
from tests.cli.test_cli import run_aura

HEAVY = [
    "aura.db",
    "aura.demo",
    "aura.gateway",
    "aura.llm",
    "aura.messaging._task",
    "aura.metrics",
    "alembic",
    "celery",
    "fastapi",
    "kombu",
    "prometheus_client",
    "redis",
    "sqlalchemy",
    "structlog",
    "uvicorn",
]
COMMANDS = [
    (),
    ("config",),
    ("chaos",),
    ("demo",),
    ("llm-sim",),
    ("gateway",),
    ("worker",),
    ("db", "upgrade"),
    ("dlq", "ls"),
    ("dlq", "show"),
    ("dlq", "replay"),
    ("dlq", "purge"),
    ("tenant", "create"),
    ("outbox", "relay"),
    ("breaker", "status"),
    ("breaker", "reset"),
    ("retries", "ls"),
    ("retries", "show"),
    ("retries", "reset"),
    ("tenants",),
]


def _loaded_by(code: str) -> list[str]:
    probe = (
        f"import sys\n{code}\n"
        f"print(__import__('json').dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    loaded: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return loaded


def test_building_the_help_loads_no_heavy_library() -> None:
    code = (
        "import sys, aura.cli\n"
        "sys.argv = ['aura', 'dlq', 'ls', '--help']\n"
        "try:\n    aura.cli.main()\nexcept SystemExit:\n    pass"
    )
    assert _loaded_by(code) == []


def test_importing_aura_messaging_loads_only_what_is_used() -> None:
    assert "aura.messaging._task" not in _loaded_by("import aura.messaging.topology")
    assert "aura.messaging._task" in _loaded_by("from aura.messaging import resilient_task")


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "aura")
def test_help_labels_are_readable(command: tuple[str, ...]) -> None:
    done = run_aura(*command, "-h")
    assert done.returncode == 0, done.stderr
    assert "Usage: aura" in done.stdout
    for label in ("<bool>", "<str>", "<int", "<float"):
        assert label not in done.stdout, (command, label)
    assert "``" not in done.stdout


def test_version() -> None:
    for flag in ("--version", "-V"):
        done = run_aura(flag)
        assert (done.returncode, done.stdout.strip()) == (0, f"aura {__version__}")


def test_completion_script() -> None:
    done = run_aura("--show-completion", "bash")
    assert done.returncode == 0, done.stderr
    assert "_AURA_COMPLETE" in done.stdout
    completions = subprocess.run(
        [sys.executable, "-m", "aura"],
        env={"_AURA_COMPLETE": "complete_bash", "COMP_WORDS": "aura dl", "COMP_CWORD": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "dlq" in completions.stdout.split()


def test_copied_names_match_their_sources() -> None:
    from aura.cli import names
    from aura.messaging._retry import KEY_PREFIX
    from aura.messaging._task import DEFER_PREFIX

    assert (names.RETRY_PREFIX, names.DEFER_PREFIX) == (KEY_PREFIX, DEFER_PREFIX)


_LOG_PROBE = """
import io, sys
from aura.logs import configure_logging
import structlog
class Terminal(io.StringIO):
    def isatty(self):
        return {tty}
out = Terminal()
configure_logging("INFO", {fmt!r}, stream=out)
structlog.get_logger("probe").info("hello", answer=42)
sys.stdout.write(out.getvalue())
"""


@pytest.mark.parametrize(
    ("fmt", "tty", "as_json"),
    [("auto", True, False), ("auto", False, True), ("json", True, True), ("console", False, False)],
)
def test_log_format_follows_the_terminal_unless_set(fmt: str, tty: bool, as_json: bool) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _LOG_PROBE.format(tty=tty, fmt=fmt)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    line = done.stdout.strip()
    assert "hello" in line
    if as_json:
        assert json.loads(line)["answer"] == 42
    else:
        assert not line.startswith("{")
        assert "answer=42" in line
