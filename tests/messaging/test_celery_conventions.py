"""A team's own Celery app under a real ``celery -A`` worker keeps Celery's meanings: the
pool the command line names is the pool; a dead-lettered delivery is a failure in Celery's
log line, signal and state (never "succeeded"), and its message is acked, not rejected
into a second, reasonless letter; every delivery's outcome is counted per task; a worker
on one queue of a two-queue app sets up native delayed delivery (its countdown retry
comes back)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kombu import Connection

from aura.messaging import DeadLetterQueue
from aura.messaging.app import pool_on_the_command_line
from tests.helpers import stop_celery_worker, wait_for
from tests.outcome_tasks import QUEUE, app

pytestmark = pytest.mark.timeout(180)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["celery", "-A", "shop", "worker", "-P", "prefork"], "prefork"),
        (["celery", "-A", "shop", "worker", "-Pthreads"], "threads"),
        (["celery", "-A", "shop", "worker", "--pool=solo", "-c", "1"], "solo"),
        (["celery", "-A", "shop", "worker", "--pool", "prefork"], "prefork"),
        (["celery", "-A", "shop", "worker", "--pool-restarts"], None),
        (["celery", "-A", "shop", "inspect", "-P", "x"], None),
        (["celery", "-A", "shop", "worker"], None),
    ],
)
def test_the_pool_named_on_the_command_line_is_found(argv: list[str], named: str | None) -> None:
    assert pool_on_the_command_line(argv) == named


class Worker:
    def __init__(self, process: subprocess.Popen[bytes], log: Path, metrics_port: int) -> None:
        self.process, self.log, self.metrics_port = process, log, metrics_port

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            return str(answer.read().decode())


def _start(amqp_url: str, redis_url: str, tmp_path: Path, *pool: str) -> Worker:
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "REDIS_"))},
        "CELERY_BROKER_URL": amqp_url,
        "REDIS_URL": redis_url,
        "WORKER_METRICS_PORT": str(port),
        "RETRY_TRACKER_MAX_RETRIES": "3",
        "LOG_FORMAT": "json",  # the app sets up no logging of its own: configure does
    }
    log = tmp_path / "worker.log"
    command = [sys.executable, "-m", "celery", "-A", "tests.outcome_tasks", "worker", *pool]
    command += ["-c", "2", "-Q", QUEUE, "-l", "INFO", "--without-gossip", "--without-mingle"]
    with log.open("wb") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    return Worker(process, log, port)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


@pytest.mark.parametrize("pool", [(), ("-P", "prefork")], ids=["async-default", "P-prefork"])
def test_a_dead_letter_is_a_failure_in_celerys_terms_and_every_outcome_is_counted(
    amqp_url: str,
    redis_url: str,
    client: redis.Redis,
    tmp_path: Path,
    pool: tuple[str, ...],
) -> None:
    worker = _start(amqp_url, redis_url, tmp_path, *pool)
    app.conf.broker_url = amqp_url
    run = uuid.uuid4().hex
    try:
        ok = app.send_task("outcome.ok", args=[run], queue=QUEUE).id
        poison = app.send_task("outcome.poison", args=[run], queue=QUEUE).id
        flaky = app.send_task("outcome.flaky", args=[run], queue=QUEUE).id
        wait_for(lambda: client.sismember("signals:task_failure", poison), within=60)
        wait_for(lambda: client.sismember("signals:task_success", flaky), within=60)
        assert client.sismember("signals:task_success", ok)
        assert not client.sismember("signals:task_success", poison)

        text = worker.log.read_text()
        logged = text.split("[tasks]", 1)[1].split("\n\n", 1)[1]  # past Celery's banner
        lines = [line for line in logged.splitlines() if line.strip()]
        assert lines
        for line in lines:  # one stream: Celery's lines and Aura's, each one JSON object
            assert isinstance(json.loads(line), dict), line
        assert "MainProcess]" not in text
        banner = text.split("[queues]")[0]  # Celery's: the pool's module in brackets
        expected = "concurrency: 2 (prefork)" if pool else "concurrency: 2 (pool)"
        assert expected in banner, banner
        assert f"outcome.poison[{poison}] succeeded" not in text
        # The app's other queue is declared too: Celery's delayed delivery binds them all
        assert "Native delayed delivery will not be available" not in text
        assert "Failed to bind" not in text
        assert f"outcome.poison[{poison}] raised expected: DeadLettered" in text, text[-3000:]

        def counted() -> bool:
            scraped = worker.metrics()
            return all(
                line in scraped
                for line in (
                    'aura_task_outcomes_total{outcome="success",reason="",task="outcome.ok"} 1.0',
                    'aura_task_outcomes_total{outcome="dead_lettered",reason="poison_pill",'
                    'task="outcome.poison"} 1.0',
                    'aura_task_outcomes_total{outcome="retry",reason="",task="outcome.flaky"} 1.0',
                    'aura_task_outcomes_total{outcome="success",reason="",task="outcome.flaky"}'
                    " 1.0",
                )
            )

        # prefork's children count in files of their own: summed with nothing set
        wait_for(counted, within=30)
        with Connection(amqp_url) as connection:
            letters = DeadLetterQueue(connection, app=app).list(limit=1000)
        mine = [x for x in letters if x.message_id in (ok, poison, flaky)]
        assert [(x.message_id, x.reason.value) for x in mine] == [(poison, "poison_pill")]
    finally:
        stop_celery_worker(worker.process)
    assert worker.process.returncode == 0, worker.log.read_text()[-3000:]


def _refused_worker(*arguments: str, env: dict[str, str] | None = None) -> str:
    """``celery -A tests.outcome_tasks worker ...`` that must stop at once: exit 2 and
    exactly one line of output; that line."""
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.outcome_tasks", "worker", *arguments],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert (done.returncode, len(lines)) == (2, 1), lines[-40:]
    return lines[0]


def test_a_bad_setting_under_celery_is_one_line_and_exit_2() -> None:
    line = _refused_worker(
        "-Q", QUEUE, env={**os.environ, "RETRY_TRACKER_MAX_RETRIES": "-3"}
    )  # it was a 37-line traceback
    assert line == "aura: invalid setting: RETRY_TRACKER_MAX_RETRIES='-3': expected a number >= 0"


def test_autoscale_on_the_async_pool_is_refused_in_one_line() -> None:
    line = _refused_worker("--autoscale=10,2")
    assert "--autoscale needs a pool of processes (-P prefork)" in line


def test_a_worker_without_redis_on_a_core_install_is_one_line(tmp_path: Path) -> None:
    """No REDIS_URL and no fakeredis (the demo extra's stand-in): one line, exit 2 (it
    was Celery's traceback of the missing module)."""
    from tests.cli.test_cli_install import _without

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("REDIS_")},
        **_without(tmp_path, "fakeredis"),
    }
    line = _refused_worker("-Q", QUEUE, env=env)
    assert "REDIS_URL is not set" in line
    assert "aura-platform[demo]" in line


@pytest.mark.parametrize(
    ("argv", "environ", "imported", "made"),
    [
        (["celery", "-A", "shop", "worker", "-P", "prefork"], {}, frozenset(), True),
        (["celery", "-A", "shop", "worker"], {"WORKER_POOL": "prefork"}, frozenset(), True),
        (["celery", "-A", "shop", "worker"], {}, frozenset(), False),  # the async pool
        (["celery", "-A", "shop", "worker", "-P", "threads"], {}, frozenset(), False),
        (["celery", "-A", "shop", "inspect"], {"WORKER_POOL": "prefork"}, frozenset(), False),
        (["celery", "-A", "shop", "worker", "-P", "prefork"], {"PROMETHEUS_MULTIPROC_DIR": "/d"},
         frozenset(), False),  # the user's own
        (["celery", "-A", "shop", "worker", "-P", "prefork"], {}, frozenset({"prometheus_client"}),
         False),  # too late: its mode is chosen (the worker then says so in one line)
    ],
)  # fmt: skip
def test_a_prefork_worker_gets_a_metrics_directory_unless_it_has_one(
    argv: list[str], environ: dict[str, str], imported: frozenset[str], made: bool
) -> None:
    from aura.process_args import prepare_prefork_metrics

    before = dict(environ)
    directory = prepare_prefork_metrics(argv, environ, imported=imported)
    assert (directory is not None) is made
    if made:
        assert directory is not None
        assert environ["PROMETHEUS_MULTIPROC_DIR"] == directory
        assert Path(directory).is_dir()
        Path(directory).rmdir()
    else:
        assert environ == before


@pytest.mark.filterwarnings("ignore::celery.exceptions.CDeprecationWarning")
def test_every_outcome_moves_its_counter_and_the_duration() -> None:
    """Eager (retries inline), with an inbox that shows one id committed: success,
    retry, deferred, dead_lettered with its reason and duplicate, each counted once."""
    from aura.config import load_settings
    from aura.errors import CircuitOpenError
    from aura.message_id import InboxEntry
    from aura.messaging import message_fingerprint, resilient_task
    from aura.worker.celery_app import make_celery_app
    from tests.helpers import metric

    eager = make_celery_app(load_settings())
    eager.conf.task_always_eager = True
    name = f"tests.outcomes.{uuid.uuid4().hex[:8]}"
    seen: dict[str, int] = {}

    class Inbox:
        async def lookup(self, message_id: str) -> InboxEntry | None:
            if message_id == "m-twin":
                return InboxEntry(fingerprint=message_fingerprint(name, ("twin",), {}))
            return None

    @resilient_task(app=eager, name=name, inbox=Inbox(), backoff_base=1.0, backoff_max=1.0)  # type: ignore[arg-type]
    def job(self: object, kind: str) -> str:
        seen[kind] = seen.get(kind, 0) + 1
        if kind == "flaky" and seen[kind] == 1:
            raise ConnectionError("once")
        if kind == "deferred" and seen[kind] == 1:
            raise CircuitOpenError("llm", 0.0)
        if kind == "poison":
            raise KeyError("no title")
        return "done"

    def count(outcome: str, reason: str = "") -> float:
        return metric("aura_task_outcomes_total", task=name, outcome=outcome, reason=reason)

    job.apply(args=("ok",), task_id="m-ok")
    job.apply(args=("flaky",), task_id="m-flaky")
    job.apply(args=("deferred",), task_id="m-deferred")
    job.apply(args=("poison",), task_id="m-poison")
    job.apply(args=("twin",), task_id="m-twin")
    assert count("success") == 3  # ok, and flaky and deferred on their second run
    assert count("retry") == 1
    assert count("deferred") == 1
    assert count("dead_lettered", "poison_pill") == 1
    assert count("duplicate") == 1
    assert metric("aura_task_duration_seconds_count", task=name) == 7
