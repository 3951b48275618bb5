"""A database outage is a wait, then a deferral, never a failure: when the database cannot
take a delivery (refused, too many clients, a wrong address), before or during its work,
the process's outage gate closes and the delivery waits at it -- no LLM call, no retry
budget -- while one trial at a time probes the database; it runs once the database
answers. Held past ``aura_outage_hold`` it is deferred through the broker (exponential
backoff) and dead-lettered ``max_deferrals_exceeded`` only once that budget is spent.
With an app of the test's own (eager: retries inline)."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from celery import Celery
from structlog.testing import capture_logs

from aura.config import load_settings
from aura.errors import LLMTimeoutError
from aura.messaging import DeadLetterQueue, resilient_task
from aura.messaging._idempotency import InboxEntry
from aura.messaging._runtime import process_runtime
from aura.worker.celery_app import make_celery_app

pytestmark = pytest.mark.filterwarnings("ignore::celery.exceptions.CDeprecationWarning")


class TooManyClients(Exception):
    sqlstate = "53300"  # asyncpg's TooManyConnectionsError says so


class OutageInbox:
    """An inbox whose database is down for the first ``down`` lookups."""

    def __init__(self, down: int, error: BaseException) -> None:
        self.down, self.error, self.lookups = down, error, 0

    async def lookup(self, message_id: str) -> InboxEntry | None:
        self.lookups += 1
        if self.lookups <= self.down:
            raise self.error
        return None


@pytest.fixture
def app() -> Iterator[Celery]:
    app = make_celery_app(load_settings())
    app.conf.task_always_eager = True
    app.conf.aura_outage_hold = 5.0  # seconds at the gate before a deferral (30 by default)
    yield app
    process_runtime(app).database_gate.succeeded()  # the process's gate, open for the next


@pytest.mark.parametrize(
    "error",
    [ConnectionRefusedError(111, "Connect call failed"), TooManyClients("too many clients")],
    ids=["refused", "too-many-clients"],
)
def test_an_outage_holds_the_delivery_at_the_gate_then_it_runs(
    app: Celery, error: BaseException
) -> None:
    ran: list[str] = []
    inbox = OutageInbox(down=4, error=error)

    @resilient_task(app=app, name=f"tests.outage.{uuid.uuid4().hex[:8]}", inbox=inbox)  # type: ignore[arg-type]
    def describe(self: Any) -> str:
        ran.append(self.request.id)  # stands for the LLM call
        return "described"

    message_id = f"outage-{uuid.uuid4().hex[:6]}"
    with capture_logs() as logs:
        assert describe.apply(task_id=message_id).get() == "described"
    assert inbox.lookups == 5  # four trials into the outage, one at a time, then through
    assert len(ran) == 1  # not once while the database was down
    events_seen = [e["event"] for e in logs]
    assert "the database is unavailable; put off before running" not in events_seen
    assert not [e for e in logs if e["event"] == "task failed; retrying"]  # no budget spent
    assert (
        events_seen.count("the database is unavailable; holding deliveries until it answers") == 1
    )
    assert events_seen.count("the database answers again; releasing held deliveries") == 1


def test_an_outage_past_the_hold_is_deferred_then_dead_lettered(app: Celery) -> None:
    app.conf.aura_outage_hold = 0.3
    ran: list[str] = []
    inbox = OutageInbox(down=1_000, error=ConnectionRefusedError(111, "Connect call failed"))
    name = f"tests.outage.{uuid.uuid4().hex[:8]}"

    @resilient_task(app=app, name=name, inbox=inbox, max_deferrals=3)  # type: ignore[arg-type]
    def describe(self: Any) -> None:
        ran.append(self.request.id)

    with capture_logs() as logs:
        describe.apply(task_id=f"outage-{uuid.uuid4().hex[:6]}")
    assert ran == []
    put_off = [
        e for e in logs if e["event"] == "the database is unavailable; put off before running"
    ]
    assert len(put_off) == 3  # held, then deferred through the broker: 3 deferrals
    countdowns = [e["countdown"] for e in put_off]
    assert all(b >= a * 0.5 for a, b in itertools.pairwise(countdowns))
    assert max(countdowns) <= 10.0
    with app.connection_for_write() as connection:
        (letter,) = [x for x in DeadLetterQueue(connection).list(limit=1000) if x.task == name]
    assert letter.reason.value == "max_deferrals_exceeded"


def test_an_outage_in_the_middle_of_a_task_is_held_not_retried(app: Celery) -> None:
    """The inbox answered, then the task's own statement met "too many clients": the gate
    closes and the delivery is tried again when it opens, its retry budget untouched."""
    attempts: list[int] = []
    inbox = OutageInbox(down=0, error=RuntimeError("unused"))

    @resilient_task(app=app, name=f"tests.outage.{uuid.uuid4().hex[:8]}", inbox=inbox)  # type: ignore[arg-type]
    def write(self: Any) -> str:
        attempts.append(self.request.retries)
        if len(attempts) < 3:  # the driver's own error, as the database sends it
            raise asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already")
        return "written"

    with capture_logs() as logs:
        assert write.apply(task_id=f"mid-{uuid.uuid4().hex[:6]}").get() == "written"
    assert attempts == [0, 0, 0]  # held and run again in the same delivery: no retry
    assert not [e for e in logs if e["event"] == "task failed; retrying"]


def test_a_wrong_database_url_is_one_line_at_start_up(pg_url: str) -> None:
    from aura.config import Settings
    from aura.messaging.app import check_database

    wrong = Settings(database_url="postgresql://shop:s3cret-pw@127.0.0.1:1/shop")
    with capture_logs() as logs:
        assert not check_database(wrong, timeout=3.0)
        assert check_database(Settings(database_url=pg_url), timeout=10.0)
    (line,) = [e for e in logs if e["log_level"] == "error"]
    assert line["event"].startswith("DATABASE_URL postgresql+asyncpg://shop:***@127.0.0.1:1/shop")
    assert "s3cret-pw" not in line["event"]
    assert "cannot be reached" in line["event"]


def test_the_hook_after_a_fate_is_tried_again_while_the_database_is_out(app: Celery) -> None:
    marked: list[str] = []
    failures = [TooManyClients("too many clients already")] * 3

    async def mark(letter: Any) -> None:  # the platform's import-record status update
        if failures:
            raise failures.pop()
        marked.append(letter.message_id)

    @resilient_task(app=app, name=f"tests.hook.{uuid.uuid4().hex[:8]}", on_dead_letter=mark)
    def poison(self: Any) -> None:
        raise KeyError("missing")

    message_id = f"hook-{uuid.uuid4().hex[:6]}"
    poison.apply(task_id=message_id)
    assert marked == [message_id]  # no record left pending
    with app.connection_for_write() as connection:  # and its letter is in the DLQ
        letters = DeadLetterQueue(connection).list(limit=1000)
    assert [x.reason.value for x in letters if x.message_id == message_id] == ["poison_pill"]


def test_two_workers_on_one_host_each_get_a_metrics_port() -> None:
    import socket

    import httpx

    from aura.messaging._observability import serve_metrics
    from tests.services import free_port

    port = free_port()
    with socket.socket() as taken:  # the first worker's endpoint
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with capture_logs() as logs:
            got = serve_metrics(port)
    assert got is not None
    assert got != port
    assert httpx.get(f"http://127.0.0.1:{got}/metrics", timeout=5).status_code == 200
    assert any(e.get("port") == got for e in logs)


def test_a_statement_the_database_refuses_is_no_outage(app: Celery) -> None:
    """SQLite's "no such table" is an OperationalError, as are connection failures: it is
    a bug to report, not an outage to wait out -- the delivery runs and its claim decides."""
    from sqlalchemy.exc import OperationalError

    ran: list[str] = []
    inbox = OutageInbox(down=1, error=OperationalError("SELECT", {}, Exception("no such table")))

    @resilient_task(app=app, name=f"tests.outage.{uuid.uuid4().hex[:8]}", inbox=inbox)  # type: ignore[arg-type]
    def describe(self: Any) -> str:
        ran.append(self.request.id)
        return "described"

    assert describe.apply().get() == "described"
    assert len(ran) == 1
    assert inbox.lookups == 1  # not put off


@pytest.mark.parametrize(
    "error",
    [
        ConnectionError("the shipping API refused"),  # the task's own: not the database
        LLMTimeoutError("no answer within 30 s"),  # raised from asyncio's TimeoutError
    ],
    ids=["task-connection-error", "llm-timeout"],
)
def test_an_error_not_from_the_database_is_retried_not_held(
    app: Celery, error: BaseException
) -> None:
    attempts: list[int] = []
    inbox = OutageInbox(down=0, error=RuntimeError("unused"))

    @resilient_task(  # type: ignore[arg-type]
        app=app, name=f"tests.outage.{uuid.uuid4().hex[:8]}", inbox=inbox, backoff_max=1.0
    )
    def call(self: Any) -> str:
        attempts.append(self.request.retries)
        if len(attempts) == 1:
            try:
                raise TimeoutError("timed out")
            except TimeoutError as cause:
                raise error from cause
        return "done"

    with capture_logs() as logs:
        assert call.apply(task_id=f"other-{uuid.uuid4().hex[:6]}").get() == "done"
    assert attempts == [0, 1]  # a retry: the budget is spent, as for any failure
    assert [e["event"] for e in logs].count("task failed; retrying") == 1
    assert "the database is unavailable; holding deliveries until it answers" not in [
        e["event"] for e in logs
    ]
