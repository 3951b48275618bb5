"""One fate per delivery, on the real services and a real worker process: whatever arrives
on a work queue and whenever a fault lands, every message is committed once or is in the
DLQ -- never both, never neither -- and the worker keeps running.

The worker's Redis is a server this module starts itself (``OwnRedis``), so it can be
stopped mid-run; the broker faults close only this run's vhost's connections.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kombu.connection import Connection
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import text

from aura.config import Settings
from aura.db import Database
from aura.messaging import DeadLetter, DeadLetterQueue
from aura.messaging.dlq import MAX_SHOWN_BODY
from aura.messaging.topology import WORK_EXCHANGE
from aura.worker.celery_app import make_celery_app
from tests import services
from tests.delivery_tasks import EFFECTS_TABLE
from tests.helpers import start_celery_worker, stop_celery_worker, wait_for, wait_until

pytestmark = pytest.mark.timeout(240)
TASKS = "tests.delivery_tasks"
EFFECT = f"{TASKS}.effect"


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    amqp_url: str
    redis: services.OwnRedis
    metrics_dir: Path
    log: Path
    database: Database
    app: Any = field(init=False)

    def __post_init__(self) -> None:
        self.app = make_celery_app(Settings(celery_broker_url=self.amqp_url))

    def send(self, *args: object, task_id: str | None = None, queue: str = "realtime_queue") -> str:
        result = self.app.send_task(EFFECT, args=list(args), task_id=task_id, queue=queue)
        return str(result.id)

    def letters(self) -> list[DeadLetter]:
        with Connection(self.amqp_url) as connection:
            return DeadLetterQueue(connection).list(limit=100_000, raw=True)

    async def effects(self, run: str) -> dict[str, int]:
        """Committed effects of ``run``: message id -> how many rows."""
        async with self.database.session() as session:
            rows = (
                await session.execute(
                    text(
                        "SELECT message_id, count(*) FROM aura_tests.delivery_effects "
                        "WHERE run = :r GROUP BY message_id"
                    ),
                    {"r": run},
                )
            ).all()
        return {str(message_id): int(n) for message_id, n in rows}

    def metric(self, name: str, **labels: str) -> float:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.metrics_dir))
        return registry.get_sample_value(name, labels) or 0.0

    def alive(self) -> bool:
        return self.process.poll() is None

    def publish_raw(
        self,
        body: bytes,
        *,
        queue: str,
        content_type: str | None,
        content_encoding: str | None,
        headers: dict[str, Any] | None,
    ) -> None:
        """Straight onto a work queue, raw AMQP, not through Celery."""
        with Connection(self.amqp_url, transport_options={"confirm_publish": True}) as conn:
            producer = conn.Producer()
            producer.publish(
                body,
                exchange=WORK_EXCHANGE,
                routing_key=queue,
                content_type=content_type,
                content_encoding=content_encoding,
                headers=headers or {},
                delivery_mode="persistent",
            )


@pytest.fixture(scope="module")
async def worker(
    amqp_url: str,
    pg_url: str,
    pg_database: Database,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Worker]:
    own_redis = services.OwnRedis(str(tmp_path_factory.mktemp("redis")))
    own_redis.start()
    async with pg_database.session() as session:
        for statement in EFFECTS_TABLE:
            await session.execute(text(statement))
        await session.commit()
    metrics_dir = tmp_path_factory.mktemp("delivery-metrics")
    log = tmp_path_factory.mktemp("delivery") / "worker.log"
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CELERY_", "REDIS_", "DATABASE_"))
        },
        "CELERY_BROKER_URL": amqp_url,
        "REDIS_URL": own_redis.url,
        "DATABASE_URL": pg_url,
        "CELERY_TASK_SOFT_TIME_LIMIT": "5",
        "CELERY_TASK_HARD_TIME_LIMIT": "10",
        "RETRY_TRACKER_MAX_RETRIES": "3",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    process = start_celery_worker(TASKS, env, log)
    running = Worker(process, amqp_url, own_redis, metrics_dir, log, pg_database)
    try:
        run = uuid.uuid4().hex
        running.send(run, "ready")
        await wait_until(lambda: _count_is(running, run, 1), within=60)  # consuming
        yield running
    finally:
        stop_celery_worker(process)
        own_redis.stop()
        if process.returncode not in (0, None):
            print(log.read_text()[-6000:])


async def _count_is(worker: Worker, run: str, n: int) -> bool:
    return len(await worker.effects(run)) == n


async def _committed(worker: Worker, run: str, ids: set[str]) -> bool:
    return set(await worker.effects(run)) == ids


def _headers(task: str = EFFECT, **extra: Any) -> dict[str, Any]:
    return {"task": task, "id": str(uuid.uuid4()), "lang": "py", **extra}


def _malformed(run: str) -> list[tuple[str, bytes, str | None, str | None, dict[str, Any] | None]]:
    """(kind, body, content type, encoding, headers): each is refused by the guard."""
    ok = json.dumps([[run, "x"], {}, {}]).encode()
    json_type, utf8 = "application/json", "utf-8"
    deep = ("[" * 1000 + f'"{run}"' + "]" * 1000).encode()
    return [
        ("not_json", f"not json {run} {{".encode(), json_type, utf8, _headers()),
        ("not_json", b'["\xff\xfe' + run.encode() + b'"]', json_type, utf8, _headers()),
        ("bad_shape", json.dumps({"run": run}).encode(), json_type, utf8, _headers()),
        ("bad_shape", json.dumps([[run], {}]).encode(), json_type, utf8, _headers()),
        ("bad_shape", json.dumps([run, {}, {}]).encode(), json_type, utf8, _headers()),
        ("bad_shape", json.dumps([[run], [], {}]).encode(), json_type, utf8, _headers()),
        ("content_type", ok, "text/plain", utf8, _headers()),
        (
            "content_type",
            b"\x80\x04K\x01." + run.encode(),
            "application/x-python-serialize",
            "binary",
            _headers(),
        ),
        ("content_type", ok, json_type, "latin-1", _headers()),
        ("not_protocol_2", ok, json_type, utf8, {"id": str(uuid.uuid4())}),
        ("not_protocol_2", ok, json_type, utf8, None),
        (
            "not_protocol_2",
            json.dumps({"task": EFFECT, "id": run, "args": []}).encode(),
            json_type,
            utf8,
            None,
        ),
        ("unknown_task", ok, json_type, utf8, _headers(task="tests.delivery_tasks.nope")),
        (
            "bad_arguments",
            json.dumps([[run, 1, 2, 3, 4, 5], {}, {}]).encode(),
            json_type,
            utf8,
            _headers(),
        ),
        (
            "bad_arguments",
            json.dumps([[run, "x"], {"nope": 1}, {}]).encode(),
            json_type,
            utf8,
            _headers(),
        ),
        ("bad_headers", ok, json_type, utf8, _headers(timelimit="soon")),
        ("bad_headers", ok, json_type, utf8, _headers(eta="the day after tomorrow")),
        ("bad_headers", ok, json_type, utf8, _headers(retries=-1)),
        ("too_deep", b"[" + deep + b", {}, {}]", json_type, utf8, _headers()),
        ("bad_message_id", ok, json_type, utf8, {**_headers(), "id": "../../etc/passwd"}),
        ("bad_message_id", ok, json_type, utf8, {**_headers(), "id": 42}),
        (
            "not_json",
            b"not zlib " + run.encode(),
            json_type,
            utf8,
            _headers(compression="application/x-gzip"),
        ),
    ]


async def test_malformed_messages_go_to_the_dlq_byte_for_byte_and_the_worker_keeps_going(
    worker: Worker,
) -> None:
    run = uuid.uuid4().hex
    before = worker.metric("messages_sent_to_dlq_total", reason="malformed_message")
    cases = _malformed(run)
    for i, (_kind, body, content_type, encoding, headers) in enumerate(cases):
        worker.publish_raw(
            body,
            queue="bulk_queue" if i % 2 else "realtime_queue",
            content_type=content_type,
            content_encoding=encoding,
            headers=headers,
        )
    good = [worker.send(run, f"good-{i}", queue="bulk_queue") for i in range(5)]

    def ours() -> list[DeadLetter]:
        return [
            letter
            for letter in worker.letters()
            if letter.original is not None and run.encode() in letter.original.raw()
        ]

    await wait_until(lambda: _committed(worker, run, set(good)), within=90)
    wait_for(lambda: len(ours()) == len(cases), within=60)
    assert worker.alive(), "a malformed message stopped the worker"
    remaining = ours()
    for kind, body, content_type, encoding, headers in cases:
        letter = next(  # its original bytes, content type, encoding and headers, exactly
            letter
            for letter in remaining
            if letter.original is not None
            and letter.original.raw() == body
            and letter.error_type == kind
            and letter.original.content_type == content_type
            and letter.original.content_encoding == encoding
            and all(letter.original.headers.get(k) == v for k, v in (headers or {}).items())
        )
        remaining.remove(letter)
        assert letter.reason.value == "malformed_message"
        assert letter.error
        assert letter.queue in ("bulk_queue", "realtime_queue")
    assert worker.metric("messages_sent_to_dlq_total", reason="malformed_message") == before + len(
        cases
    )
    with Connection(worker.amqp_url) as connection:  # queued: nothing left behind to loop
        for queue in ("bulk_queue", "realtime_queue"):
            _, ready, _ = connection.default_channel.queue_declare(queue, passive=True)
            assert ready == 0


async def test_redis_down_while_retried_tasks_succeed_never_commits_and_dead_letters(
    worker: Worker,
) -> None:
    run = uuid.uuid4().hex
    sent = {worker.send(run, f"n{i}", 1) for i in range(20)}  # each fails once, then commits
    worker.redis.stop()
    try:
        await wait_until(lambda: _committed(worker, run, sent), within=90)
    finally:
        worker.redis.start()
    mine = [letter for letter in worker.letters() if run in letter.task_args]
    assert mine == []  # committed, so never also dead-lettered
    assert set((await worker.effects(run)).values()) == {1}
    assert worker.alive()
    again = worker.send(run, "after", 1)  # and it works on with Redis back
    await wait_until(lambda: _committed(worker, run, {*sent, again}), within=60)


async def test_broker_connections_closed_in_a_loop_every_message_committed_once(
    worker: Worker,
) -> None:
    run = uuid.uuid4().hex
    # 0.4 s each on the worker's two children: 6 s of work, about as long as the 8 closes
    # below take (a rabbitmqctl each); 40 left ~3.5 s of work after the last close
    sent = {worker.send(run, f"n{i}", 0, 0.4) for i in range(30)}
    closes = 0
    while not await _committed(worker, run, sent) and closes < 8:
        services.rabbitmqctl(
            "close_all_connections", "-p", services.AMQP_TEST_VHOST, "test_delivery"
        )
        closes += 1
    await wait_until(lambda: _committed(worker, run, sent), within=90)
    assert closes >= 2, "the tasks finished before the faults: nothing was tested"
    assert set((await worker.effects(run)).values()) == {1}  # each committed exactly once
    mine = [letter for letter in worker.letters() if run in letter.task_args]
    assert mine == [], [(letter.reason, letter.error) for letter in mine]
    assert worker.alive()


async def test_a_reused_id_with_another_payload_is_a_conflict_never_a_silent_success(
    worker: Worker,
) -> None:
    run = uuid.uuid4().hex
    message_id = f"order-{run}"
    worker.send(run, "first", task_id=message_id)
    await wait_until(lambda: _committed(worker, run, {message_id}), within=60)
    duplicates = worker.metric("aura_duplicate_deliveries_total", kind="committed")

    worker.send(run, "second", task_id=message_id)  # same id, another payload
    worker.send(run, "first", task_id=message_id)  # same id, same payload: a duplicate

    def letters() -> list[DeadLetter]:
        return [letter for letter in worker.letters() if letter.message_id == message_id]

    wait_for(
        lambda: (
            len(letters()) == 1
            and worker.metric("aura_duplicate_deliveries_total", kind="committed") >= duplicates + 1
        ),
        within=60,
    )
    (letter,) = letters()
    assert letter.reason.value == "conflicting_message_id"
    assert letter.task_args == [run, "second"]
    assert "another payload" in letter.error
    assert await worker.effects(run) == {message_id: 1}


def test_a_10_mb_record_reaches_its_fate_inside_the_soft_limit(worker: Worker) -> None:
    run = uuid.uuid4().hex
    huge = json.dumps({"title": "x" * 10_000_000, "run": run})
    deep = "[" * 100_000 + "]" * 100_000
    ids = {
        worker.app.send_task(f"{TASKS}.parse", args=[raw, run], queue="bulk_queue").id: raw
        for raw in (huge, deep)
    }
    timeouts = worker.metric("celery_task_timeouts_total", kind="soft")

    def mine() -> list[DeadLetter]:
        return [letter for letter in worker.letters() if letter.message_id in ids]

    wait_for(lambda: len(mine()) == 2, within=90)
    for letter in mine():
        assert letter.reason.value == "poison_pill", letter.error
        assert letter.retries == 0
        # views show a bounded, redacted head; replay reads the whole from the letter's bytes
        shown, shown_run = letter.task_args
        assert shown_run == run
        assert ids[letter.message_id].startswith(shown)
        assert len(shown) == min(len(ids[letter.message_id]), MAX_SHOWN_BODY)
    errors = sorted(letter.error for letter in mine())
    assert "over the 4000000 limit" in errors[1] or "over the 4000000 limit" in errors[0]
    assert any("nested too deep" in error for error in errors)
    assert worker.metric("celery_task_timeouts_total", kind="soft") == timeouts


def test_the_worker_exit_status_is_not_zero_after_an_unrecoverable_error(
    amqp_url: str, tmp_path: Path
) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CELERY_")},
        "CELERY_BROKER_URL": amqp_url,
    }
    done = subprocess.run(
        [sys.executable, "-m", "tests.broken_worker"],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0, done.stderr.decode()[-2000:]
    assert b"Unrecoverable error" in done.stderr + done.stdout
