"""The DLQ is safe to operate, for any app, on the real services: reading never changes a
letter, replay never loses one, bombs stay compressed, every view redacts.

The broker side is a vhost of this module's own (its DLQ, its policy); the store is the
run's PostgreSQL database; the app is the test's own (``tests.dlq_app_tasks``: queue
``reviews_summaries``, task ``reviews.summarise``), run by a real worker process.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import uuid
import zlib
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import brotli
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu.connection import Connection
from kombu.messaging import Producer
from sqlalchemy import text
from typer.testing import CliRunner

from aura.db import Database
from aura.events import DeadLetterReason
from aura.messaging.dlq import DeadLetter, DeadLetterQueue, publish_dead_letter
from aura.messaging.topology import DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, dead_letter_queue
from aura.worker.process import start_worker_process, stop_worker_process
from tests import services
from tests.helpers import metric, wait_for

pytestmark = pytest.mark.timeout(240)
# tests.dlq_app_tasks's names (not imported: configuring its app here would make it the
# default app of this process's @resilient_task)
QUEUE = "reviews_summaries"
TASK = "reviews.summarise"
SUMMARIES_TABLE = (
    "CREATE SCHEMA IF NOT EXISTS aura_tests",
    "CREATE TABLE IF NOT EXISTS aura_tests.summaries ("
    " id BIGSERIAL PRIMARY KEY, message_id TEXT NOT NULL, tenant_id TEXT NOT NULL)",
)


@pytest.fixture(scope="module")
def vhost() -> Iterator[str]:
    """A vhost of this module's own: its DLQ and policies are ours to set."""
    name = f"aura_dlq_{uuid.uuid4().hex[:10]}"
    services.rabbitmqctl("add_vhost", name)
    services.rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    try:
        yield name
    finally:
        services.rabbitmqctl("delete_vhost", name)


@pytest.fixture(scope="module")
def broker_url(vhost: str) -> str:
    return f"amqp://guest:guest@{services.AMQP_HOST}/{vhost}"


@pytest.fixture
def connection(broker_url: str) -> Iterator[Connection]:
    with Connection(broker_url, transport_options={"confirm_publish": True}) as conn:
        dead_letter_queue()(conn.default_channel).declare()
        yield conn


def reader(connection: Connection, pg_url: str) -> DeadLetterQueue:
    return DeadLetterQueue(connection, pg_url)


def letter(message_id: str, reason: DeadLetterReason, **fields: Any) -> DeadLetter:
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "message_id": message_id,
        "reason": reason,
        "task": TASK,
        "queue": QUEUE,
        "task_args": ["a review", "tenant-a"],
        "first_failure_at": now,
        "last_failure_at": now,
        "tenant_id": "tenant-a",
    }
    return DeadLetter(**(values | fields))


def publish_task(connection: Connection, queue: str, args: list[Any], message_id: str) -> None:
    """A Celery protocol 2 message for ``TASK``, straight to ``queue`` (as Celery sends)."""
    headers = {"lang": "py", "task": TASK, "id": message_id, "root_id": message_id}
    headers |= {"retries": 0, "timelimit": [None, None], "eta": None, "expires": None}
    body = [args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    with connection.channel() as channel:
        Producer(channel).publish(
            body, exchange="", routing_key=queue, serializer="json", headers=headers,
            delivery_mode="persistent",
        )  # fmt: skip


def publish_raw(
    connection: Connection, body: bytes, headers: dict[str, Any], *, routing_key: str, **props: Any
) -> None:
    with connection.channel() as channel:
        Producer(channel).publish(
            body, exchange="" if routing_key != DEAD_LETTER_QUEUE else DEAD_LETTER_EXCHANGE,
            routing_key=routing_key, headers=headers, delivery_mode="persistent", **props,
        )  # fmt: skip


def queue_depth(connection: Connection, name: str) -> int:
    with connection.channel() as channel:
        return int(channel.queue_declare(name, passive=True).message_count)


# -- the worker: the test's own app ---------------------------------------------------


@pytest.fixture(scope="module")
async def app_worker(
    broker_url: str, pg_url: str, pg_database: Database, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, Any]]:
    async with pg_database.session() as session:
        for statement in SUMMARIES_TABLE:
            await session.execute(text(statement))
        await session.commit()
    scratch = tmp_path_factory.mktemp("dlq-app")
    own_redis = services.OwnRedis(str(tmp_path_factory.mktemp("dlq-redis")))
    own_redis.start()
    broken = scratch / "broken"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "REDIS_"))},
        "CELERY_BROKER_URL": broker_url,
        "REDIS_URL": own_redis.url,
        "DATABASE_URL": pg_url,
        "DLQ_TEST_BROKEN": str(broken),
        "WORKER_METRICS_PORT": "0",
    }
    log = scratch / "worker.log"
    with log.open("wb") as output:
        process = start_worker_process(
            "tests.dlq_app_tasks", env, output, queues=[QUEUE], concurrency=2
        )
    try:
        with Connection(broker_url) as conn:
            wait_for(lambda: _queue_exists(conn, QUEUE), within=60)
        yield {"process": process, "broken": broken, "log": log, "env": env}
    finally:
        stop_worker_process(process, timeout=30)
        own_redis.stop()
    assert process.returncode == 0, log.read_text()[-3000:]


def _queue_exists(connection: Connection, name: str) -> bool:
    try:
        queue_depth(connection, name)
    except Exception:
        return False
    return True


async def summaries(database: Database, message_id: str) -> int:
    async with database.session() as session:
        found = await session.scalar(
            text("SELECT count(*) FROM aura_tests.summaries WHERE message_id = :m"),
            {"m": message_id},
        )
    return int(found or 0)


def letters_of(dlq: DeadLetterQueue, message_id: str) -> list[DeadLetter]:
    return [x for x in dlq.list(task=TASK, limit=1000) if x.message_id == message_id]


def cli(env: dict[str, str], *args: str) -> Any:
    from aura.cli import app
    from aura.config import get_settings

    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(app, list(args), catch_exceptions=False)
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        get_settings.cache_clear()


async def test_a_poison_letter_replayed_fails_again_once_then_commits_once_after_the_fix(
    app_worker: dict[str, Any], connection: Connection, pg_url: str, pg_database: Database
) -> None:
    dlq = reader(connection, pg_url)
    env = {"CELERY_BROKER_URL": str(connection.as_uri(include_password=True))}
    env["DLQ_DATABASE_URL"] = pg_url
    app_worker["broken"].touch()
    message_id = str(uuid.uuid4())
    publish_task(connection, QUEUE, ["great shoes", "tenant-a"], message_id)
    wait_for(lambda: len(letters_of(dlq, message_id)) == 1, within=60)
    (first,) = letters_of(dlq, message_id)
    assert (first.reason, first.queue, first.replay_count) == (
        DeadLetterReason.POISON_PILL, QUEUE, 0,
    )  # fmt: skip

    done = cli(env, "dlq", "replay", first.id, "--by", "test-operator")
    assert done.exit_code == 0, done.output
    assert f"to {QUEUE}" in done.output
    wait_for(lambda: [x.replay_count for x in letters_of(dlq, message_id)] == [1], within=60)
    (again,) = letters_of(dlq, message_id)
    assert again.id == first.id  # back in the DLQ once, found by the same id
    assert await summaries(pg_database, message_id) == 0

    app_worker["broken"].unlink()  # the fix
    done = cli(env, "dlq", "replay", first.id)
    assert done.exit_code == 0, done.output
    for _ in range(600):
        if await summaries(pg_database, message_id) == 1:
            break
        await asyncio.sleep(0.1)
    assert await summaries(pg_database, message_id) == 1  # committed once
    assert letters_of(dlq, message_id) == []  # gone from the DLQ
    record = dlq.replays(first.id)
    assert [(r["operator"], r["to_queue"], r["replay_count"]) for r in record][:1] == [
        ("test-operator", QUEUE, 1)
    ]
    assert len(record) == 2
    assert cli(env, "dlq", "replay", first.id).exit_code == 0  # replayed already: nothing sent
    assert await summaries(pg_database, message_id) == 1


def test_replay_run_twice_at_once_enqueues_once(connection: Connection, pg_url: str) -> None:
    target = f"replay_target_{uuid.uuid4().hex[:8]}"
    with connection.channel() as channel:
        channel.queue_declare(target, durable=True, auto_delete=False)
    dlq = reader(connection, pg_url)
    ids = [str(uuid.uuid4()) for _ in range(5)]
    for message_id in ids:
        publish_dead_letter(connection, letter(message_id, DeadLetterReason.WORKER_LOST,
                                               queue=target, task="other.task"))  # fmt: skip
    letters = [x for x in dlq.list(limit=1000) if x.message_id in ids]
    assert len(letters) == 5
    broker_url = connection.as_uri(include_password=True)
    for one in letters:
        reports: list[Any] = []

        def operator(one: DeadLetter = one, reports: list[Any] = reports) -> None:
            with Connection(broker_url, transport_options={"confirm_publish": True}) as mine:
                reports.append(reader(mine, pg_url).replay(letter_id=one.id))

        threads = [threading.Thread(target=operator) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sum(len(r.replayed) for r in reports) == 1
    assert queue_depth(connection, target) == 5  # each letter enqueued once
    assert [x for x in dlq.list(limit=1000) if x.message_id in ids] == []


# 20: RabbitMQ 4.x's default for quorum queues, the stricter case (a read that spent a
# delivery would drop letters past it); a queue without a limit loses none either way
@pytest.mark.parametrize("delivery_limit", [20])
def test_60_reads_of_600_letters_change_nothing(
    connection: Connection, pg_url: str, vhost: str, delivery_limit: int | None
) -> None:
    if delivery_limit is not None:  # as RabbitMQ 4.x quorum queues have it by default
        services.rabbitmqctl(
            "set_policy", "-p", vhost, "--apply-to", "queues", "dlq-limit",
            "^aura\\.dlq$", json.dumps({"delivery-limit": delivery_limit}),
        )  # fmt: skip
    source = f"reads-{uuid.uuid4().hex[:8]}"
    dlq = DeadLetterQueue(connection, pg_url, source=source)
    reasons = list(DeadLetterReason)
    letters = 600  # filed in two batches (500 a batch), every reason; each list takes all
    for n in range(letters):
        publish_dead_letter(
            connection, letter(f"m-{n}", reasons[n % len(reasons)], fingerprint=f"f{n % 3}")
        )
    first = [x.model_dump() for x in dlq.list(limit=letters)]
    assert len(first) == letters
    counts = dlq.count_by_reason()
    sample = first[417]["id"]
    for n in range(60):  # three times the delivery limit a read could have spent
        match n % 4:
            case 0:
                assert [x.model_dump() for x in dlq.list(limit=letters)] == first
            case 1:
                assert dlq.count_by_reason() == counts
            case 2:
                shown = dlq.show(sample)
                assert shown is not None
                assert shown.model_dump() == first[417]
            case _:
                assert dlq.count(reason="poison_pill") == counts["poison_pill"]
    assert [x.model_dump() for x in dlq.list(limit=letters)] == first  # every letter, in place
    assert [x["message_id"] for x in first] == [f"m-{n}" for n in range(letters)]  # newest last
    assert queue_depth(connection, DEAD_LETTER_QUEUE) == 0  # filed once, never browsed


@pytest.mark.filterwarnings("ignore::celery.exceptions.CDeprecationWarning")
def test_a_forged_and_an_oversized_letter_are_refused(connection: Connection, pg_url: str) -> None:
    from aura.contract import BULK_QUEUE, INGEST_TASK
    from aura.worker.celery_app import celery_app
    from aura.worker.tasks import ingest_product

    assert ingest_product.name == INGEST_TASK
    tenant_a, tenant_b = str(uuid.uuid4()), str(uuid.uuid4())
    with connection.channel() as channel:
        channel.queue_declare(
            BULK_QUEUE, durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"}
        )
    dlq = DeadLetterQueue(connection, pg_url, app=celery_app)
    forged = letter(str(uuid.uuid4()), DeadLetterReason.POISON_PILL, task=INGEST_TASK,
                    queue=BULK_QUEUE, task_args=['{"title": "x"}', tenant_b],
                    tenant_id=tenant_a)  # fmt: skip
    oversized = letter(str(uuid.uuid4()), DeadLetterReason.POISON_PILL, task=INGEST_TASK,
                       queue=BULK_QUEUE, task_args=["x" * 305_832, tenant_a],
                       tenant_id=tenant_a)  # fmt: skip
    publish_dead_letter(connection, forged)
    publish_dead_letter(connection, oversized)
    under_a = [x.message_id for x in dlq.list(tenant=tenant_a, limit=1000)]
    assert forged.message_id not in under_a  # filed under the tenant its arguments name
    assert oversized.message_id in under_a
    for bad, why in ((forged, "forged"), (oversized, "oversized")):
        (found,) = [x for x in dlq.list(limit=1000) if x.message_id == bad.message_id]
        report = dlq.replay(letter_id=found.id)
        assert report.replayed == []
        assert next(w for _, w in report.refused).startswith(why)
        assert dlq.show(found.id) is not None  # refused: it stays
    assert queue_depth(connection, BULK_QUEUE) == 0


def test_replay_refuses_an_unknown_origin_or_a_missing_queue_and_a_malformed_letter(
    connection: Connection, pg_url: str
) -> None:
    dlq = reader(connection, pg_url)
    lost = letter(str(uuid.uuid4()), DeadLetterReason.WORKER_LOST, queue="")
    gone = letter(str(uuid.uuid4()), DeadLetterReason.WORKER_LOST, queue="no_such_queue_here")
    publish_dead_letter(connection, lost)
    publish_dead_letter(connection, gone)
    publish_raw(connection, b"\xff\xfe not json", {"x-aura-format": "original",
                "x-aura-reason": "malformed_message", "x-aura-kind": "not_json"},
                routing_key=DEAD_LETTER_QUEUE)  # fmt: skip
    listed = dlq.list(limit=1000)
    by_id = {x.message_id: x for x in listed}
    refusals = {
        "unknown": dlq.replay(letter_id=by_id[lost.message_id].id).refused[0][1],
        "missing": dlq.replay(letter_id=by_id[gone.message_id].id).refused[0][1],
    }
    assert "origin queue is unknown" in refusals["unknown"]
    assert "does not exist" in refusals["missing"]
    malformed = next(x for x in listed if x.original is not None and "not json" in x.original.body)
    report = dlq.replay(letter_id=malformed.id)  # found by the id ls prints
    assert "malformed message" in report.refused[0][1]


def test_retention_drops_the_oldest_past_the_bound_and_counts_them(
    connection: Connection, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aura.config import get_settings

    monkeypatch.setenv("DLQ_RETENTION_LETTERS", "5")
    get_settings.cache_clear()
    dlq = DeadLetterQueue(connection, pg_url, source=f"retention-{uuid.uuid4().hex[:8]}")
    before = metric("aura_dlq_letters_dropped_total", reason="task_failed")
    for n in range(8):
        publish_dead_letter(connection, letter(f"r-{n}", DeadLetterReason.TASK_FAILED))
    assert [x.message_id for x in dlq.list()] == [f"r-{n}" for n in range(3, 8)]
    assert dlq.dropped == {"task_failed": 3}
    assert metric("aura_dlq_letters_dropped_total", reason="task_failed") == before + 3


# -- bombs ------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("VmRSS:")).split()[1])


def test_compression_bombs_are_malformed_letters_with_their_bytes_and_cost_no_memory(
    app_worker: dict[str, Any], connection: Connection, pg_url: str
) -> None:
    pid = app_worker["process"].pid
    dlq = reader(connection, pg_url)
    payload = b"[" + b" " * (300 * 1024 * 1024) + b"]"
    small = b"[" + b" " * 600_000 + b"]"  # 600 KB from ~600 bytes: legal size, bomb ratio
    bombs = [
        ("application/x-brotli", brotli.compress(payload, quality=9)),  # 483 B; 11: 6 s
        ("application/x-gzip", zlib.compress(payload, 9)),
        ("application/x-gzip", zlib.compress(small, 9)),
    ]
    assert len(bombs[0][1]) < 1000
    assert len(bombs[2][1]) < 1000
    warm = str(uuid.uuid4())  # the malformed-message path once, so its imports are counted
    publish_raw(connection, b"{not json", {"lang": "py", "task": TASK, "id": warm},
                routing_key=QUEUE, content_type="application/json")  # fmt: skip
    wait_for(lambda: any(x.message_id == warm for x in dlq.list(limit=1000)), within=60)
    before = rss_kib(pid)
    sent: dict[str, tuple[str, bytes]] = {}
    for codec, body in bombs:
        message_id = str(uuid.uuid4())
        sent[message_id] = (codec, body)
        headers = {"lang": "py", "task": TASK, "id": message_id, "compression": codec}
        publish_raw(connection, body, headers, routing_key=QUEUE,
                    content_type="application/json", content_encoding="utf-8")  # fmt: skip

    def found() -> list[DeadLetter]:
        return [x for x in dlq.list(limit=1000, raw=True) if x.message_id in sent]

    wait_for(lambda: len(found()) == len(bombs), within=60)
    for bomb in found():
        codec, body = sent[bomb.message_id]
        assert bomb.reason is DeadLetterReason.MALFORMED_MESSAGE
        assert bomb.error_type == "inflates_too_far"
        assert bomb.original is not None
        assert bomb.original.raw() == body  # byte for byte
        assert bomb.original.headers["compression"] == codec
    assert rss_kib(pid) - before < 50 * 1024
    assert app_worker["process"].poll() is None  # the worker lives on


# -- every view redacts -------------------------------------------------------------------

KEY = "sk-live-0123456789abcdefghijABCDEFGH"  # 34 characters, registered as the LLM key
PASSWORD = "Pa55w0rd-Very-Secret-9x"
TOKEN = "tok_ABCDEFGHIJKLMNOPQRSTUVWX"
SECRETS = (KEY, PASSWORD, TOKEN)


def leaks(text: str) -> list[str]:
    """Any 8 consecutive characters of a planted secret in ``text``."""
    return [s[i : i + 8] for s in SECRETS for i in range(len(s) - 7) if s[i : i + 8] in text]


def test_every_secret_kind_in_every_field_is_absent_from_every_view(
    connection: Connection, pg_url: str, vhost: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from aura.logs import register_secret

    register_secret(KEY)
    url = f"postgresql://app:{PASSWORD}@db.internal/shop"
    bearer = f"Authorization: Bearer {TOKEN}"
    everywhere = f"{url} {bearer} {KEY}"
    run = uuid.uuid4().hex[:8]
    long_name = "x" * 38 + f"password={PASSWORD}"
    # Broker-dead-lettered (raw Celery message, x-death): args, kwargs, task header.
    body = json.dumps([[everywhere], {"dsn": url, "note": everywhere}, {}]).encode()
    publish_raw(connection, body, {"id": f"b-{run}", "task": f"t {everywhere}",
                "x-death": [{"reason": "rejected", "queue": QUEUE, "count": 1}],
                long_name: everywhere}, routing_key=DEAD_LETTER_QUEUE,
                content_type="application/json")  # fmt: skip
    # A malformed original whose body is not UTF-8 and holds the key.
    raw = b"\xff\xfe" + everywhere.encode() + b"\x80" * 10
    publish_raw(connection, raw, {"x-aura-format": "original", "x-aura-reason":
                "malformed_message", "id": f"o-{run}", "task": everywhere, long_name: url,
                "x-aura-error": everywhere}, routing_key=DEAD_LETTER_QUEUE)  # fmt: skip
    # An Aura letter whose error cuts the key at the 1000-character mark.
    publish_dead_letter(connection, letter(f"a-{run}", DeadLetterReason.POISON_PILL,
                        error="e" * 990 + KEY, task_args=[everywhere]))  # fmt: skip
    env = {"CELERY_BROKER_URL": connection.as_uri(include_password=True)}
    env["DLQ_DATABASE_URL"] = pg_url
    outputs = [cli(env, "dlq", "ls", "--limit", "1000").output]
    outputs.append(cli(env, "dlq", "ls", "--json", "--limit", "1000").output)
    rows = [json.loads(line) for line in outputs[-1].splitlines() if line.startswith("{")]
    planted = [r for r in rows if r["message_id"].endswith(run) or r["id"].endswith(run)]
    assert len(planted) == 3
    for row in planted:
        outputs.append(cli(env, "dlq", "show", row["id"]).output)
    outputs.append(capsys.readouterr().err)
    for output in outputs:
        assert leaks(output) == [], output[:2000]
    assert "***" in outputs[1]


def test_the_table_fits_80_columns_and_prints_letters_literally(
    connection: Connection, pg_url: str
) -> None:
    from aura.cli.dlq import _table, literal

    hostile = letter(str(uuid.uuid4()), DeadLetterReason.POISON_PILL,
                     error="\x1b[2J\x1b]0;pwned\x07[bold red]x[/] " + "w" * 300)  # fmt: skip
    lines = _table([hostile], 80)
    assert all(len(line) <= 80 for line in lines)
    assert hostile.message_id in "\n".join(lines)
    assert "\x1b" not in "\n".join(lines)
    assert "\\x1b[2J" in "\n".join(lines)
    assert literal("ok\x00\u202e") == "ok\\x00\\u202e"


def test_the_llm_clients_error_texts_are_redacted_before_they_are_cut() -> None:
    import httpx

    from aura.llm.client import _error_text
    from aura.logs import register_secret

    key = "sk-provider-abcdefghijklmnopqrstu"  # 30+ characters
    register_secret(key)
    text = "x" * 180 + key
    response = httpx.Response(401, json={"error": {"message": text}})
    shown = _error_text(response)
    assert key[:6] not in shown
    assert len(shown) <= 200


# -- the one-fate property of the store ---------------------------------------------------

_fates = st.lists(
    st.tuples(
        st.sampled_from(["m1", "m2", "m3", "m4"]),
        st.sampled_from([DeadLetterReason.POISON_PILL, DeadLetterReason.WORKER_LOST]),
        st.sampled_from(["f1", "f2"]),
        st.integers(min_value=1, max_value=3),  # copies (a crash between confirm and ack)
    ),
    max_size=12,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fates=_fates, reads=st.integers(min_value=1, max_value=4))
def test_one_letter_per_fate_however_many_copies_and_reads(
    fates: list[tuple[str, DeadLetterReason, str, int]], reads: int
) -> None:
    with Connection(f"memory://prop-{uuid.uuid4().hex}") as conn:
        queue = dead_letter_queue()(conn.default_channel)
        queue.declare()
        queue.purge()  # kombu's memory transport shares its queues across the process
        dlq = DeadLetterQueue(conn)
        expected: list[tuple[str, str, str]] = []
        for message_id, reason, fingerprint, copies in fates:
            key = (message_id, reason.value, fingerprint)
            for _ in range(copies):
                publish_dead_letter(conn, letter(message_id, reason, fingerprint=fingerprint))
            if key not in expected:
                expected.append(key)
        views = [[x.model_dump() for x in dlq.list(limit=1000)] for _ in range(reads)]
        got = [(x["message_id"], x["reason"].value, x["fingerprint"]) for x in views[0]]
        assert got == expected  # one per fate, in the order they landed
        assert all(view == views[0] for view in views)
