"""The core install is honest: a command that needs an extra says so in ``--help`` and,
without it, stops with one line naming the extra (exit 2); a command that needs the
broker or Redis fails fast with one line naming its URL, password masked; ``aura config``
says which values came from ``.env``.

An extra is made missing without uninstalling anything: a ``sitecustomize`` on PYTHONPATH
puts a finder first on ``sys.meta_path`` that refuses its modules, as a core install
would (``tests/project/test_example_project.py`` runs the real core wheel, once)."""

from __future__ import annotations

import re
import socket
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from aura.cli.extras import EXTRAS
from tests.cli.test_cli import run_aura

ROOT = Path(__file__).resolve().parents[2]

_BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, _NotInstalled())
"""


def _without(tmp_path: Path, *modules: str) -> dict[str, str]:
    """An environment in which ``modules`` cannot be imported (nor found)."""
    (tmp_path / "sitecustomize.py").write_text(_BLOCKER.format(blocked=set(modules)))
    return {"PYTHONPATH": str(tmp_path)}


def _pyproject_modules(extra: str, extras: dict[str, list[str]]) -> set[str]:
    """The import names of what pyproject's ``extra`` installs everywhere (a requirement
    with a platform marker is optional: the code runs without it)."""
    modules: set[str] = set()
    for requirement in extras[extra]:
        spec, _, marker = requirement.partition(";")
        found = re.match(r"[A-Za-z0-9_.-]+", spec.strip())
        assert found is not None, requirement
        name = found.group(0)
        if name == "aura-platform":
            inner = re.search(r"\[(.*)\]", spec)
            assert inner is not None, requirement
            for each in inner.group(1).split(","):
                modules |= _pyproject_modules(each.strip(), extras)
        elif not marker.strip():
            modules.add(name.lower().replace("-", "_"))
    return modules


def test_the_extras_table_is_pyprojects() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    # tracing is no command's: OTEL_* turns it on, and without it a process runs untraced
    # (tests/tracing/test_tracing_off.py)
    assert set(EXTRAS) == set(extras) - {"platform", "dev", "tracing"}
    for extra, modules in EXTRAS.items():
        assert set(modules) == _pyproject_modules(extra, extras), extra


def test_help_names_each_commands_extra() -> None:
    done = run_aura("--help")
    assert done.returncode == 0, done.stderr
    lines = {line.split()[1]: line for line in done.stdout.splitlines() if line.count("│") == 2}
    for command, extra in [("demo", "demo"), ("tenant", "gateway"), ("outbox", "gateway")]:
        assert f"(needs aura-platform[{extra}])" in lines[command], lines[command]
    for needs in ("(needs aura-platform[gateway])", "(needs aura-platform[chaos])"):
        assert needs in done.stdout
    for command in ("config", "llm-sim", "worker", "dlq", "db", "breaker", "retries"):
        assert "needs aura-platform" not in lines[command]


@pytest.mark.parametrize(
    ("command", "extra"),
    [
        (("demo", "--products", "5"), "demo"),
        (("gateway",), "gateway"),
        (("chaos", "--list"), "chaos"),
        (("tenant", "create", "shop"), "gateway"),
        (("outbox", "relay"), "gateway"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, tuple) else value,
)
def test_a_command_without_its_extra_is_one_line(
    tmp_path: Path, command: tuple[str, ...], extra: str
) -> None:
    blocked = ("fastapi", "uvicorn", "aio_pika", "httptools", "fakeredis")
    env = {**_without(tmp_path, *blocked), "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//"}
    done = run_aura(*command, env=env, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    missing = ", ".join(module for module in EXTRAS[extra] if module in blocked)
    assert done.stderr.strip().splitlines() == [
        f"aura: this command needs aura-platform[{extra}], not installed here (no {missing}): "
        f"pip install 'aura-platform[{extra}]'"
    ]


def test_one_missing_module_is_enough(tmp_path: Path) -> None:
    done = run_aura("gateway", env=_without(tmp_path, "httptools"), cwd=tmp_path)
    assert done.returncode == 2
    assert "(no httptools): pip install 'aura-platform[gateway]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_embedded_default_without_its_extra_is_one_line(tmp_path: Path) -> None:
    done = run_aura("db", "upgrade", env=_without(tmp_path, "aiosqlite"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "aura: no module 'aiosqlite', part of aura-platform[demo]: pip install "
        "'aura-platform[demo]', or set DATABASE_URL (unset, it is the embedded default, "
        "which needs it)"
    ]


def _closed_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port: int = listener.getsockname()[1]
    return port


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that takes connections (the kernel's backlog) and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


_BROKER_COMMANDS = [
    ("dlq", "ls"),
    ("dlq", "count"),
    ("outbox", "relay"),
    ("gateway",),
    ("demo", "--products", "5"),
]


def _fails_fast(done_in: float, stderr: str, expected_start: str) -> None:
    assert done_in < 8, done_in  # 2 s of connect timeout; CI machines are noisy
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr[-2000:]
    assert lines[0].startswith(expected_start), lines[0]
    assert "secret" not in stderr


@pytest.mark.parametrize("command", _BROKER_COMMANDS, ids=" ".join)
def test_the_broker_down_is_one_line_at_once(tmp_path: Path, command: tuple[str, ...]) -> None:
    port = _closed_port()
    env = {
        "CELERY_BROKER_URL": f"amqp://guest:secret@127.0.0.1:{port}//",
        # all three set: the demo on the real services, which checks the broker first
        "DATABASE_URL": f"sqlite:///{tmp_path}/demo.db",
        "REDIS_URL": f"redis://127.0.0.1:{_closed_port()}/0",
    }
    started = time.monotonic()
    done = run_aura(*command, env=env, cwd=tmp_path)
    took = time.monotonic() - started
    assert done.returncode == 2
    _fails_fast(
        took, done.stderr, f"aura: cannot use RabbitMQ at amqp://guest:***@127.0.0.1:{port}//"
    )


def test_a_broker_that_never_answers_is_bounded(tmp_path: Path, silent_port: int) -> None:
    env = {"CELERY_BROKER_URL": f"amqp://guest:secret@127.0.0.1:{silent_port}//"}
    started = time.monotonic()
    done = run_aura("dlq", "ls", env=env, cwd=tmp_path)
    took = time.monotonic() - started
    assert done.returncode == 2
    _fails_fast(
        took,
        done.stderr,
        f"aura: cannot use RabbitMQ at amqp://guest:***@127.0.0.1:{silent_port}//",
    )
    assert "timed out" in done.stderr


def test_redis_down_names_its_url_masked() -> None:
    port = _closed_port()
    started = time.monotonic()
    done = run_aura("breaker", "status", env={"REDIS_URL": f"redis://:secret@127.0.0.1:{port}/0"})
    took = time.monotonic() - started
    assert done.returncode == 2
    _fails_fast(took, done.stderr, f"aura: cannot use Redis at redis://:***@127.0.0.1:{port}/0: ")


def _sources(stdout: str) -> dict[str, str]:
    rows = [line.split("│") for line in stdout.splitlines() if line.count("│") == 4]
    return {cells[1].strip(): cells[3].strip() for cells in rows}


def test_config_says_which_values_came_from_the_env_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("DB_POOL_SIZE=7\nLOG_LEVEL=debug\n")
    (tmp_path / "staging.env").write_text("WORKER_POOL=prefork\n")
    done = run_aura("config", env={"LOG_LEVEL": "WARNING"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    sources = _sources(done.stdout)
    assert sources["DB_POOL_SIZE"] == ".env"
    assert sources["LOG_LEVEL"] == "environment"  # the environment wins over the file
    assert sources["DB_MAX_OVERFLOW"] == "default"
    named = run_aura("config", env={"AURA_ENV_FILE": "staging.env"}, cwd=tmp_path)
    assert named.returncode == 0, named.stderr
    assert _sources(named.stdout)["WORKER_POOL"] == "staging.env"
    assert _sources(named.stdout)["DB_POOL_SIZE"] == "default"  # .env is not read then
