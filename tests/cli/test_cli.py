"""The CLI as a user meets it: a real process, real exit codes, no tracebacks."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from aura.errors import InvalidInputError


def run_aura(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "LANG", "TMPDIR"}}
    return subprocess.run(
        [sys.executable, "-m", "aura", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
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


def malformed_among_first(count: int) -> int:
    from aura.catalog import parse_product
    from aura.demo.runner import catalog_records

    bad = 0
    for record in catalog_records(count):
        try:
            parse_product(json.loads(record))
        except (ValueError, InvalidInputError):
            bad += 1
    return bad


@pytest.mark.timeout(150)
def test_demo_accounts_for_every_record_on_embedded_defaults(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    done = run_aura(
        "demo", "--products", "80", "--json", "--report", str(reports), cwd=tmp_path, timeout=140
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    _assert_demo_timeline(reports)
    malformed = malformed_among_first(80)
    assert malformed >= 2  # the bundled catalog mixes bad records in from the start
    assert report["accepted"] == 80
    assert report["lost"] == 0
    assert report["duplicates"] == 0
    # Every record: enriched once, or in the DLQ with its reason (no LLM fault outlives
    # three retries here, so only the malformed records are dead letters).
    assert report["dead_lettered"].get("poison_pill") == malformed
    assert report["enriched"] + sum(report["dead_lettered"].values()) == 80
    assert report["breaker_opens"] >= 1  # the injected outage opened it
    assert report["deferrals"] >= 1  # ...and tasks were put off, not failed
    assert 0 < report["latency_p50_s"] <= report["latency_p99_s"]
    assert report["throughput_per_s"] > 0
    assert (tmp_path / ".aura" / "demo.log").stat().st_size > 0  # the worker's logs
    _assert_readable(report)


def _assert_readable(report: dict[str, Any]) -> None:
    """Without --json, the same report as a table, its verdict and where to look next
    (what ``aura demo`` prints; rendered here from the run's JSON, one demo run fewer)."""
    from io import StringIO

    from rich.console import Console

    from aura.cli.demo import _print
    from aura.demo.report import DemoReport

    out = StringIO()
    fields = {key: value for key, value in report.items() if key != "llm_extra"}  # derived
    _print(Console(file=out, width=200), DemoReport(**fields))
    printed = out.getvalue()
    for row in ("accepted", "enriched by the LLM", "lost (must be 0)", "duplicates (must be 0)"):
        assert row in printed
    assert "nothing lost, nothing doubled" in printed
    assert "aura dlq ls" in printed


def _assert_demo_timeline(reports: Path) -> None:
    """``--report``: the demo's page and data, its scheduled LLM outage as a window, its
    fates and breaker sampled, an index naming it."""
    pages = sorted(reports.glob("*.json"))
    assert len(pages) == 1, pages
    data = json.loads(pages[0].read_text())
    assert data["passed"] is True
    groups = {group["name"]: group for group in data["groups"]}
    assert {"rate", "latency", "fates", "breaker"} <= set(groups)
    assert max(v for v in groups["fates"]["series"]["committed"] if v is not None) > 0
    assert sum(v or 0 for v in groups["rate"]["series"]["records/s"]) > 0
    outages = [w for w in data["windows"] if "outage" in w["label"].lower()]
    assert outages, data["windows"]
    assert all(0 <= w["start_s"] <= w["end_s"] <= data["duration_s"] for w in outages)
    assert pages[0].with_suffix(".html").stat().st_size > 50_000  # uPlot inlined
    assert pages[0].stem in (reports / "index.html").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--products", "0"), "--products must be between 1 and 20000, got 0"),
        (("--faults", "wild"), "--faults must be one of off, default, heavy, got 'wild'"),
    ],
)
def test_demo_refuses_bad_options_in_one_line(args: tuple[str, ...], message: str) -> None:
    done = run_aura("demo", *args)
    assert done.returncode == 2
    assert done.stderr.strip() == f"aura: {message}"


def head_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from aura.catalog.migrate import MIGRATIONS

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
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


PG = "postgresql://postgres:pw5678@127.0.0.1:5432"
RABBIT = "amqp://guest:guest@127.0.0.1:5672"


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (
            ("db", "upgrade"),
            {"DATABASE_URL": "postgresql://u:pw5678@127.0.0.1:1/x"},
            "PostgreSQL at postgresql+asyncpg://u:***@127.0.0.1:1/x: ",
        ),
        (
            ("db", "upgrade"),
            {"DATABASE_URL": f"{PG}/aura_no_such_database"},
            'database "aura_no_such_database" does not exist',
        ),
        (
            ("tenant", "create", "acme"),
            {"DATABASE_URL": "postgresql://aura_no_such_role:pw5678@127.0.0.1:5432/test"},
            "PostgreSQL at postgresql+asyncpg://aura_no_such_role:***@127.0.0.1:5432/test: "
            'role "aura_no_such_role" does not exist',
        ),
        (
            ("outbox", "relay"),
            {"CELERY_BROKER_URL": "amqp://guest:pw5678@127.0.0.1:1//"},
            "RabbitMQ at amqp://guest:***@127.0.0.1:1//: [Errno 111] Connection refused",
        ),
        (
            ("outbox", "relay"),
            {"CELERY_BROKER_URL": "amqp://guest:pw5678@127.0.0.1:5672//"},
            "RabbitMQ at amqp://guest:***@127.0.0.1:5672//: (0, 0): (403) ACCESS_REFUSED",
        ),
        (
            ("gateway",),
            {"CELERY_BROKER_URL": f"{RABBIT}/aura_no_such_vhost"},
            "NOT_ALLOWED - vhost aura_no_such_vhost not found",
        ),
        (
            ("gateway",),
            {"CELERY_BROKER_URL": f"{RABBIT}//", "DATABASE_URL": f"{PG}/aura_no_such_database"},
            "PostgreSQL at postgresql+asyncpg://postgres:***@127.0.0.1:5432/aura_no_such_database: "
            'database "aura_no_such_database" does not exist',
        ),
        (
            ("retries", "ls"),
            {"REDIS_URL": "redis://:pw5678@127.0.0.1:1/0"},
            "Redis",
        ),
    ],
)
def test_a_service_that_cannot_be_used_is_one_line_naming_it_exit_2(
    args: tuple[str, ...], env: dict[str, str], expected: str
) -> None:
    done = run_aura(*args, env={**env, "DB_CONNECT_TIMEOUT": "5"}, timeout=40)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr + done.stdout
    assert "pw5678" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("aura: ")
    assert expected in lines[0]


@pytest.mark.parametrize("broker", [None, "memory://localhost/"])
def test_the_gateway_refuses_to_start_without_a_broker_its_workers_can_reach(
    broker: str | None,
) -> None:
    done = run_aura("gateway", env={"CELERY_BROKER_URL": broker} if broker else {})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "aura gateway needs CELERY_BROKER_URL" in lines[0]
    assert "`aura demo` runs the embedded gateway" in lines[0]


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


@pytest.mark.parametrize("latency", [0.0, 0.005, 0.3, 1.0, 5.0, 60.0])
def test_the_demos_llm_timeouts_stay_above_the_latency_it_simulates(latency: float) -> None:
    """`aura demo --llm-latency 1` once timed out every call (read timeout 1 s)."""
    from aura.demo.runner import DEMO_ENVIRONMENT, demo_environment

    environment = demo_environment(latency)
    read, deadline = float(environment["LLM_READ_TIMEOUT"]), float(environment["LLM_CALL_DEADLINE"])
    assert read >= 2 * latency  # an answer, with its jitter, arrives well within it
    assert deadline > read  # and a retry inside the deadline still has time
    if latency <= 0.25:  # the one-minute demo keeps its short timeouts
        assert environment == DEMO_ENVIRONMENT
