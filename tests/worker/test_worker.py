"""@resilient_task in a real Celery worker process, on real RabbitMQ and Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from celery import Celery
from kombu.connection import Connection
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from aura.config import Settings
from aura.messaging import DeadLetter, DeadLetterQueue
from aura.worker.celery_app import make_celery_app
from tests.helpers import start_celery_worker, stop_celery_worker, wait_for

pytestmark = pytest.mark.timeout(120)
TASKS = "tests.messaging_tasks"


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    app: Celery
    amqp_url: str
    redis: redis.Redis
    metrics_dir: Path
    env: dict[str, str]

    def send(self, task: str, *args: object, queue: str = "realtime_queue", **limits: float) -> str:
        result = self.app.send_task(f"{TASKS}.{task}", args=list(args), queue=queue, **limits)
        return str(result.id)

    def dead_letters(self, run: str) -> list[DeadLetter]:
        with Connection(self.amqp_url) as connection:
            letters = DeadLetterQueue(connection).list(limit=1000)
        return [letter for letter in letters if run in letter.task_args]

    def dlq_metric(self, reason: str) -> float:
        return self.metric("messages_sent_to_dlq_total", reason=reason)

    def metric(self, name: str, **labels: str) -> float:
        """A counter summed over the worker's processes (multiprocess mode)."""
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.metrics_dir))
        return registry.get_sample_value(name, labels) or 0.0

    def count(self, key: str) -> int:
        return int(self.redis.get(key) or 0)


@pytest.fixture(scope="module")
def worker(
    amqp_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    metrics_dir = tmp_path_factory.mktemp("metrics")
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "REDIS_"))},
        "CELERY_BROKER_URL": amqp_url,
        "REDIS_URL": redis_url,
        "CELERY_TASK_SOFT_TIME_LIMIT": "1",
        "CELERY_TASK_HARD_TIME_LIMIT": "2",
        "RETRY_TRACKER_MAX_RETRIES": "3",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    stale = metrics_dir / "counter_999999.db"  # left by an earlier run in the same dir
    stale.write_bytes(b"stale")
    process = start_celery_worker(TASKS, env, log)
    app = make_celery_app(Settings(celery_broker_url=amqp_url))
    client = redis.Redis.from_url(redis_url)
    running = Worker(process, app, amqp_url, client, metrics_dir, env)
    try:
        run = uuid.uuid4().hex
        running.send("flaky", run, 0)
        wait_for(lambda: client.scard(f"{run}:done") == 1, within=60)  # consuming
        assert not stale.exists()  # removed at start: its counts would be summed in
        yield running
    except AssertionError:
        print(log.read_text()[-5000:])
        raise
    finally:
        stop_celery_worker(process)
        client.close()


def test_poison_pills_go_to_the_dlq_at_once_and_the_rest_succeed(worker: Worker) -> None:
    run = uuid.uuid4().hex
    before = worker.dlq_metric("poison_pill")
    malformed = {
        worker.send("parse_record", f"not json {i}", run, queue="bulk_queue") for i in range(10)
    }
    for i in range(90):
        worker.send("parse_record", f'{{"sku": "S-{i}"}}', run, queue="bulk_queue")

    wait_for(
        lambda: worker.redis.scard(f"{run}:done") == 90 and len(worker.dead_letters(run)) == 10
    )
    letters = worker.dead_letters(run)
    assert {letter.message_id for letter in letters} == malformed
    for letter in letters:
        assert letter.reason.value == "poison_pill"
        assert letter.retries == 0
        assert letter.error.startswith("malformed JSON: Expecting value at line 1 column 1")
        assert letter.queue == "bulk_queue"
        assert letter.task == f"{TASKS}.parse_record"
        assert not worker.redis.exists(f"retry_count:{letter.message_id}")  # no retry spent
    assert worker.dlq_metric("poison_pill") == before + 10


def test_transient_failures_are_retried_then_succeed(worker: Worker) -> None:
    run = uuid.uuid4().hex
    task_id = worker.send("flaky", run, 2)
    wait_for(lambda: worker.redis.sismember(f"{run}:done", task_id))
    assert worker.count(f"{run}:attempts") == 3
    assert not worker.redis.exists(f"retry_count:{task_id}")  # cleared on success
    assert worker.dead_letters(run) == []


def test_a_task_that_always_fails_is_dead_lettered_after_max_retries(worker: Worker) -> None:
    run = uuid.uuid4().hex
    before = worker.dlq_metric("max_retries_exceeded")
    task_id = worker.send("always_fails", run)
    wait_for(lambda: len(worker.dead_letters(run)) == 1)
    (letter,) = worker.dead_letters(run)
    assert letter.message_id == task_id
    assert letter.reason.value == "max_retries_exceeded"
    assert letter.retries == 3
    assert letter.error_type == "TimeoutError"
    assert worker.count(f"{run}:attempts") == 4  # max_retries + 1 executions, no more
    assert worker.dlq_metric("max_retries_exceeded") == before + 1


def test_an_async_task_past_the_soft_limit_is_cancelled_cleanly(worker: Worker) -> None:
    run = uuid.uuid4().hex
    soft_before = worker.metric("celery_task_timeouts_total", kind="soft")
    # The worker's limits are its environment's; this message's own soft limit (kept by
    # its retries) is below them: the same timer, four tries sooner.
    (conf,) = worker.app.control.inspect(timeout=10, limit=1).conf().values()
    assert (conf["task_soft_time_limit"], conf["task_time_limit"]) == (1, 2)
    worker.send("slow_async", run, 30, soft_time_limit=0.5)
    wait_for(lambda: len(worker.dead_letters(run)) == 1, within=60)
    assert worker.metric("celery_task_timeouts_total", kind="soft") == soft_before + 4
    (letter,) = worker.dead_letters(run)
    assert letter.reason.value == "max_retries_exceeded"
    assert letter.error_type == "SoftTimeLimitExceeded"
    assert worker.count(f"{run}:attempts") == 4
    assert worker.count(f"{run}:cleaned") == 4  # its cancellation cleanup ran every time


def test_a_task_ignoring_the_soft_limit_is_killed_and_the_worker_serves_others(
    worker: Worker,
) -> None:
    run = uuid.uuid4().hex
    hard_before = worker.metric("celery_task_timeouts_total", kind="hard")
    # The message's own limits (kept by its redeliveries), below the worker's 1 s / 2 s
    stubborn = worker.send("stubborn", run, 30, soft_time_limit=0.5, time_limit=1)
    wait_for(lambda: worker.count(f"{run}:ignored_soft_limit") >= 1)  # it got the soft limit
    other_run = uuid.uuid4().hex
    others = {worker.send("flaky", other_run, 0) for _ in range(5)}
    wait_for(lambda: worker.redis.smembers(f"{other_run}:done") == {o.encode() for o in others})
    # Killed at the hard limit on every delivery: the broker's delivery limit ends it.
    wait_for(lambda: len(worker.dead_letters(run)) == 1, within=90)
    (letter,) = worker.dead_letters(run)
    assert letter.message_id == stubborn
    assert letter.reason.value == "worker_lost"
    assert worker.count(f"{run}:attempts") == 4
    # Counted by the main process, once per kill.
    assert worker.metric("celery_task_timeouts_total", kind="hard") == hard_before + 4


def test_a_message_that_kills_its_worker_lands_in_the_dlq(worker: Worker) -> None:
    run = uuid.uuid4().hex
    killer = worker.send("suicide", run)
    for i in range(10):
        worker.send("parse_record", f'{{"sku": "K-{i}"}}', run, queue="bulk_queue")
    wait_for(lambda: worker.redis.scard(f"{run}:done") == 10, within=60)
    wait_for(lambda: len(worker.dead_letters(run)) == 1, within=60)
    (letter,) = worker.dead_letters(run)
    assert letter.message_id == killer
    assert letter.reason.value == "worker_lost"
    assert letter.queue == "realtime_queue"
    assert worker.count(f"{run}:attempts") == 4  # max_retries + 1 deliveries


def aura_cli(worker: Worker, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aura", *args],
        env=worker.env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_replay_brings_a_dead_letter_back_once_its_cause_is_fixed(worker: Worker) -> None:
    run = uuid.uuid4().hex
    task_id = worker.send("needs_fix", run)
    wait_for(lambda: len(worker.dead_letters(run)) == 1)
    (letter,) = worker.dead_letters(run)
    assert letter.reason.value == "poison_pill"

    shown = aura_cli(worker, "dlq", "show", letter.id)
    assert shown.returncode == 0, shown.stderr
    assert f'"message_id": "{task_id}"' in shown.stdout

    worker.redis.set(f"{run}:fixed", 1)
    replayed = aura_cli(worker, "dlq", "replay", letter.id)
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1 dead letter(s)" in replayed.stdout
    wait_for(lambda: worker.redis.sismember(f"{run}:done", task_id))
    assert worker.dead_letters(run) == []


def test_cli_refuses_bad_input_and_purge_removes_only_its_reason(worker: Worker) -> None:
    run = uuid.uuid4().hex
    worker.send("always_fails", run)  # its retries run while the CLI refuses bad input
    worker.send("parse_record", "{broken", run, queue="bulk_queue")
    bad = aura_cli(worker, "dlq", "ls", "--reason", "Bogus!")  # a rule's own is snake_case
    assert bad.returncode == 2
    assert "unknown reason 'Bogus!'" in bad.stderr
    missing = aura_cli(worker, "dlq", "show", "no-such-letter")
    assert missing.returncode == 2
    assert "no dead letter with id 'no-such-letter'" in missing.stderr

    wait_for(lambda: len(worker.dead_letters(run)) == 2)
    with Connection(worker.amqp_url) as connection:
        poison_before = len(DeadLetterQueue(connection).list(reason="poison_pill", limit=1000))

    refused = aura_cli(worker, "dlq", "purge", "--reason", "max_retries_exceeded", stdin="n\n")
    assert refused.returncode == 1  # asked, and the answer was no
    assert len(worker.dead_letters(run)) == 2

    purged = aura_cli(worker, "dlq", "purge", "--reason", "max_retries_exceeded", "--yes")
    assert purged.returncode == 0, purged.stderr
    remaining = worker.dead_letters(run)
    assert [letter.reason.value for letter in remaining] == ["poison_pill"]
    with Connection(worker.amqp_url) as connection:
        assert len(DeadLetterQueue(connection).list(reason="poison_pill", limit=1000)) == (
            poison_before
        )
    listed = aura_cli(worker, "dlq", "ls", "--reason", "poison_pill", "--json", "--limit", "1000")
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.strip().splitlines()) == poison_before
