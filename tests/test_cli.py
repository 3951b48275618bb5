"""The CLI as a user meets it: a real process, real exit codes, no tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys


def run_aura(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "LANG", "TMPDIR"}}
    return subprocess.run(
        [sys.executable, "-m", "aura", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, "COLUMNS": "200", **(env or {})},
        check=False,
    )


def test_help_lists_the_commands() -> None:
    done = run_aura("--help")
    assert done.returncode == 0
    for command in ("config", "demo"):
        assert command in done.stdout


def test_bad_setting_exits_2_with_one_line_and_no_traceback() -> None:
    done = run_aura("config", env={"DB_POOL_SIZE": "abc"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "aura: invalid setting: DB_POOL_SIZE='abc': expected a whole number"
    ]
    assert "Traceback" not in done.stderr + done.stdout


def test_config_masks_secrets() -> None:
    done = run_aura(
        "config",
        "--json",
        env={"LLM_API_KEY": "sk-live-777777", "REDIS_URL": "redis://:pw123456@cache:6379/0"},
    )
    assert done.returncode == 0, done.stderr
    assert "sk-live-777777" not in done.stdout
    assert "pw123456" not in done.stdout
    assert '"REDIS_URL": "redis://:***@cache:6379/0"' in done.stdout


def test_demo_runs_on_embedded_defaults() -> None:
    done = run_aura("demo")
    assert done.returncode == 0, done.stderr
    assert "metrics missing: 0" in done.stdout
