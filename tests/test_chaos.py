"""The chaos scenarios, scaled down, on this run's real services: CI proves each one.

Each runs as a user runs it (``aura chaos NAME --json``) against the run's own database,
Redis db and vhost, with a real prefork worker and the LLM simulator. A scenario passes
only with nothing lost, nothing doubled and every message where it was expected to end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aura.chaos import SCENARIOS
from tests.test_cli import run_aura

# Records per scenario here (the CLI's defaults are larger).
SCALED = {
    "poison": 30,
    "flaky-llm": 30,
    "llm-outage": 40,
    "db-kill": 40,
    "worker-kill": 40,
    "hanging": 24,
    "killer": 20,
    "redis-restart": 40,
    "rabbitmq-close": 40,
    "load": 300,
}


def test_every_scenario_is_scaled_here() -> None:
    assert set(SCALED) == set(SCENARIOS)
    assert len(SCENARIOS) == 10


def test_list_and_bad_input() -> None:
    listed = run_aura("chaos", "--list")
    assert listed.returncode == 0
    assert [line.split()[0] for line in listed.stdout.splitlines()] == list(SCENARIOS)
    unknown = run_aura("chaos", "nope", env={"DATABASE_URL": "postgresql+asyncpg://x/y"})
    assert unknown.returncode == 2
    assert "unknown scenario 'nope'" in unknown.stderr
    embedded = run_aura("chaos", "poison")
    assert embedded.returncode == 2
    assert "set DATABASE_URL, REDIS_URL and CELERY_BROKER_URL" in embedded.stderr


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", list(SCALED))
def test_scenario_passes_on_the_real_stack(
    name: str, pg_url: str, redis_url: str, amqp_url: str, tmp_path: Path
) -> None:
    env = {"DATABASE_URL": pg_url, "REDIS_URL": redis_url, "CELERY_BROKER_URL": amqp_url}
    done = run_aura(
        "chaos", name, "--products", str(SCALED[name]), "--json", env=env, cwd=tmp_path,
        timeout=230,
    )  # fmt: skip
    log = tmp_path / ".aura" / f"chaos-{name}.log"
    assert done.returncode in (0, 1), done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout)
    context = f"{result}\n{log.read_text()[-3000:] if log.exists() else ''}"
    assert result["scenario"] == name
    assert result["passed"], context
    assert done.returncode == 0
    assert result["lost"] == 0
    assert result["duplicates"] == 0
    details = result["details"]
    sent = SCALED[name]
    if name == "poison":
        assert result["dead_lettered"]["poison_pill"] == result["sent"] - sent
        assert result["committed"] == sent
    elif name in ("killer", "hanging"):  # the message that kills its worker every time
        assert result["dead_lettered"] == {"worker_lost": 1}
        assert result["committed"] == sent
    else:
        assert result["dead_lettered"] == {}
        assert result["committed"] == sent
    if name == "llm-outage":
        assert result["breaker_opens"] >= 1
        assert result["deferrals"] > 0
        assert "llm_calls_during_outage" in details
    if name == "db-kill":
        assert details["backends_killed"] > 0
        assert details["products_without_variants"] == 0
    if name == "worker-kill":
        assert details["processes_killed"] > 0
    if name == "hanging":
        assert details["soft_timeouts"] > 0  # hanging LLM calls, cancelled and retried
        assert details["hard_timeouts"] > 0  # the stubborn task, killed and recycled
    if name == "rabbitmq-close":
        assert details["connections_closed"] == 2
    if name == "redis-restart":
        assert details["redis_down_s"] > 0
    if name == "flaky-llm":
        assert 0 < result["retries"] <= 8 * sent
