"""The alert rules (promtool) and a real Prometheus server scraping the real endpoints.

promtool and prometheus come from Debian's ``prometheus`` package; ``.ci/run`` installs
it when missing (locally, without it, these tests are skipped and say why).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from aura.metrics import SEED_METRIC_NAMES
from tests.helpers import start_celery_worker, stop_celery_worker, wait_for
from tests.promql import known_series, metric_names
from tests.services import free_port

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing: apt-get install prometheus (.ci/run does)"
)
# The names a scrape shows for each seed metric (a histogram as its buckets).
SEED_SERIES = {
    name: f"{name}_bucket" if name.endswith("_seconds") else name for name in SEED_METRIC_NAMES
}


def rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load((RULES / "alerts.yml").read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


@needs_promtool
def test_promtool_checks_the_rules_and_their_unit_tests_pass() -> None:
    assert PROMTOOL is not None
    check = subprocess.run(
        [PROMTOOL, "check", "rules", "alerts.yml"], cwd=RULES, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(rules())} rules found" in check.stdout
    tested = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts_test.yml"], cwd=RULES, capture_output=True, text=True
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    tests = yaml.safe_load((RULES / "alerts_test.yml").read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in rules()}
    assert firing == names
    assert quiet == names


def test_rules_use_only_our_metrics_and_point_at_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", readme, flags=re.MULTILINE)
    }
    series = known_series()
    for rule in rules():
        unknown = metric_names(rule["expr"]) - series
        assert not unknown, f"{rule['alert']} names unknown metrics {unknown}"
        annotations = rule["annotations"]
        assert annotations["summary"]
        anchor = re.match(r"README\.md#([a-z0-9-]+)", annotations["runbook"])
        assert anchor is not None, rule["alert"]
        assert anchor.group(1) in anchors, f"{rule['alert']}: no README section {anchor.group(1)}"
    covered = set().union(*(metric_names(rule["expr"]) for rule in rules()))
    for name in (
        "llm_circuit_breaker_opens_total",
        "messages_sent_to_dlq_total",
        "database_transaction_rollbacks_total",
        "celery_task_timeouts_total",
        "celery_tasks_pending",
    ):
        assert name in covered  # the seed's four thresholds, and pending tasks


@pytest.fixture(scope="module")
def endpoints(
    pg_url: str, redis_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """The real gateway (``aura gateway``) and a real prefork worker, each on a port."""
    gateway_port, worker_port = free_port(), free_port()
    logs = tmp_path_factory.mktemp("scrape")
    env = {
        **{k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "LANG", "TMPDIR"}},
        "DATABASE_URL": pg_url,
        "REDIS_URL": redis_url,
        "CELERY_BROKER_URL": amqp_url,
        "LOG_LEVEL": "WARNING",
    }
    worker_env = {
        **env,
        "WORKER_METRICS_PORT": str(worker_port),
        "PROMETHEUS_MULTIPROC_DIR": str(logs),
        "WORKER_QUEUE_POLL_INTERVAL": "0.5",
    }
    worker = start_celery_worker("aura.worker.tasks", worker_env, logs / "worker.log")
    with (logs / "gateway.log").open("wb") as output:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "aura", "gateway", "--port", str(gateway_port)],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    targets = {
        "gateway": f"127.0.0.1:{gateway_port}",
        "worker": f"127.0.0.1:{worker_port}",
    }
    try:
        for target in targets.values():
            wait_for(lambda t=target: _answers(f"http://{t}/metrics"), within=60, interval=0.2)
        yield targets
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
        stop_celery_worker(worker)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus missing: apt-get install prometheus")
@pytest.mark.timeout(120)
def test_a_real_prometheus_scrapes_every_seed_metric_from_gateway_and_worker(
    endpoints: dict[str, str], tmp_path: Path
) -> None:
    assert PROMETHEUS is not None
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES / "alerts.yml")],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [target]}]}
            for job, target in endpoints.items()
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    with (tmp_path / "prometheus.log").open("wb") as output:
        server = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/-/ready"), within=60, interval=0.2)

        def names_by_job() -> dict[str, set[str]]:
            found: dict[str, set[str]] = {}
            for job in endpoints:
                answer = httpx.get(f"{api}/series", params={"match[]": f'{{job="{job}"}}'})
                found[job] = {series["__name__"] for series in answer.json()["data"]}
            return found

        def all_seen() -> bool:
            found = names_by_job()
            return all(set(SEED_SERIES.values()) <= found[job] for job in endpoints)

        try:
            wait_for(all_seen, within=60, interval=0.5)
        except AssertionError:
            found = names_by_job()
            missing = {job: set(SEED_SERIES.values()) - found[job] for job in endpoints}
            raise AssertionError(f"not scraped: {missing}") from None
        health = httpx.get(f"{api}/targets").json()["data"]["activeTargets"]
        assert {target["labels"]["job"]: target["health"] for target in health} == {
            "gateway": "up",
            "worker": "up",
        }
        groups = httpx.get(f"{api}/rules").json()["data"]["groups"]
        loaded = [rule for group in groups for rule in group["rules"]]
        assert len(loaded) == len(rules())
        assert all(rule["health"] in {"ok", "unknown"} for rule in loaded), loaded
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.timeout(120)
def test_the_worker_exports_the_dlqs_true_depth(endpoints: dict[str, str], amqp_url: str) -> None:
    """aura_dlq_messages is read from the broker: letters written by anyone count."""
    import asyncio
    import uuid

    from kombu.connection import Connection

    from aura.messaging import route_to_dlq
    from aura.messaging.topology import dead_letter_queue

    with Connection(amqp_url) as connection:
        for _ in range(2):
            message_id = f"depth-{uuid.uuid4()}"
            asyncio.run(route_to_dlq(message_id, "poison_pill", connection=connection, task="t"))

    def in_broker() -> int:
        with Connection(amqp_url) as connection:
            declared = dead_letter_queue()(connection.default_channel).queue_declare(passive=True)
        return int(declared.message_count)

    def exported() -> float | None:
        text = httpx.get(f"http://{endpoints['worker']}/metrics", timeout=2).text
        found = re.search(r"^aura_dlq_messages(?:\{[^}]*\})? (\S+)$", text, re.M)
        return float(found.group(1)) if found else None

    # The broker's own count lags a publish a little (quorum queue statistics).
    wait_for(lambda: in_broker() >= 2, within=30, interval=0.2)
    wait_for(lambda: exported() == in_broker(), within=30, interval=0.2)
