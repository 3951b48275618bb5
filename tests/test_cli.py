"""The CLI as a user meets it: a real process, real exit codes, no tracebacks."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx


def run_aura(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "LANG", "TMPDIR"}}
    return subprocess.run(
        [sys.executable, "-m", "aura", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
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


def test_demo_runs_on_embedded_defaults(tmp_path: Path) -> None:
    done = run_aura("demo", cwd=tmp_path)  # the embedded database lands under ./.aura
    assert done.returncode == 0, done.stderr
    assert "checks failed: 0" in done.stdout
    assert "seed metrics exposed: 6/6" in done.stdout


def head_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from aura.db import migrate

    config = Config()
    config.set_main_option("script_location", str(migrate._SCRIPTS))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def test_db_upgrade_migrates_the_configured_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    first = run_aura("db", "upgrade", env={"DATABASE_URL": url, "LOG_LEVEL": "WARNING"})
    assert first.returncode == 0, first.stderr
    assert f"is at revision {head_revision()}" in first.stdout
    again = run_aura("db", "upgrade", env={"DATABASE_URL": url, "LOG_LEVEL": "WARNING"})
    assert again.returncode == 0, again.stderr
    tables = sqlite3.connect(tmp_path / "cli.db").execute(
        "select name from sqlite_master where type='table' order by name"
    )
    assert {row[0] for row in tables} >= {
        "tenants",
        "products",
        "variants",
        "enrichments",
        "processed_messages",
        "alembic_version",
    }


def test_db_upgrade_on_an_unreachable_server_is_one_line(tmp_path: Path) -> None:
    done = run_aura("db", "upgrade", env={"DATABASE_URL": "postgresql://u:pw5678@127.0.0.1:1/x"})
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "pw5678" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_llm_sim_serves_completions_and_refuses_bad_rates() -> None:
    bad = run_aura("llm-sim", "--error-rate", "1.5")
    assert bad.returncode == 2
    assert "--error-rate must be between 0 and 1, got 1.5" in bad.stderr

    process = subprocess.Popen(
        [sys.executable, "-m", "aura", "llm-sim", "--port", "0", "--error-rate", "1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # printed once it listens
        base_url = line.split(" on ", 1)[1].split()[0]
        answer = httpx.post(
            f"{base_url}/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}]},
            timeout=5,
        )
        assert answer.status_code in {500, 503, 429}
        stats = httpx.get(base_url.removesuffix("/v1") + "/admin/stats", timeout=5).json()
        assert stats["requests"] == 1
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
