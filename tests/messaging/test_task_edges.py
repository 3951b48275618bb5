"""``@resilient_task`` pinned where a user would notice a change (found by
scripts/mutation.py): each fate of a delivery, the seed's defaults, the backoff and its
floor, Retry-After, the DLQ marker and the hooks. Eager, in process: Celery's in-memory
broker and the embedded Redis stand-in (the worker tests run the same over RabbitMQ)."""

from __future__ import annotations

import json
import random
import uuid
from typing import Any

import pytest
from celery import Celery
from structlog.testing import capture_logs

from aura.config import load_settings
from aura.errors import (
    CircuitOpenError,
    ConflictingMessageIdError,
    DeadLettered,
    LLMHTTPStatusError,
)
from aura.message_id import InboxEntry
from aura.messaging import DeadLetter, DeadLetterQueue, resilient_task
from aura.messaging._task import DEFER_PREFIX, backoff_delay
from aura.worker.celery_app import make_celery_app
from tests.helpers import metric

# Any new app binds every shared task made so far; when aura.worker.tasks was imported
# first (the mutation runner preloads it), Celery warns about their ``queue`` option.
pytestmark = pytest.mark.filterwarnings("ignore::celery.exceptions.CDeprecationWarning")


@pytest.fixture
def app() -> Celery:
    app = make_celery_app(load_settings())  # in-memory broker; eager: retries run inline
    app.conf.task_always_eager = True
    return app


def unique(label: str) -> str:
    return f"tests.pins.{label}.{uuid.uuid4().hex[:8]}"


def letters(app: Celery, task: str) -> list[DeadLetter]:
    with app.connection_for_write() as connection:
        return DeadLetterQueue(connection).list(task=task, limit=1000)


def retried(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "task failed; retrying"]


def test_backoff_delay() -> None:
    rng = random.Random(7)
    for attempt, ceiling in ((1, 2.0), (2, 4.0), (3, 8.0), (4, 10.0), (50, 10.0), (0, 2.0)):
        delays = [backoff_delay(attempt, base=2.0, cap=10.0, rng=rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 4  # jittered over the upper half
    assert backoff_delay(10_000, base=1.0, cap=60.0, rng=rng) <= 60.0  # no overflow


def test_a_success_after_failures_clears_the_counters(app: Celery) -> None:
    name = unique("recovers")
    runs: list[int] = []

    @resilient_task(app=app, name=name)
    def flaky(self: object) -> str:
        runs.append(1)
        if len(runs) < 3:
            raise ConnectionError("reset")
        return "done"

    with capture_logs() as logs:
        result = flaky.apply(task_id="m-recovers")
    assert result.get() == "done"
    assert len(runs) == 3
    assert [e["attempt"] for e in retried(logs)] == [1, 2]
    assert all(e["countdown"] >= 1.0 for e in retried(logs))  # RabbitMQ's floor
    assert retried(logs)[0]["message_id"] == "m-recovers"
    assert letters(app, name) == []


def test_the_default_budget_is_three_retries_then_the_dlq(app: Celery) -> None:
    name = unique("exhausted")
    runs: list[int] = []
    before = metric("messages_sent_to_dlq_total", reason="max_retries_exceeded")

    @resilient_task(app=app, name=name)
    def always_fails(self: object, tenant_id: str, n: int) -> None:
        runs.append(1)
        raise ConnectionError("down")

    with capture_logs() as logs:
        always_fails.apply(args=("t-7",), kwargs={"n": 1}, task_id="m-exhausted").get(
            propagate=False
        )
    assert len(runs) == 4  # max_retries + 1 executions
    assert [e["attempt"] for e in retried(logs)] == [1, 2, 3]
    (letter,) = letters(app, name)
    assert (letter.reason.value, letter.retries, letter.message_id) == (
        "max_retries_exceeded",
        3,
        "m-exhausted",
    )
    assert (letter.error_type, letter.error, letter.tenant_id) == ("ConnectionError", "down", "t-7")
    assert (letter.task_args, letter.task_kwargs) == (["t-7"], {"n": 1})
    assert metric("messages_sent_to_dlq_total", reason="max_retries_exceeded") == before + 1
    sent = [e for e in logs if e["event"] == "message sent to the dead-letter queue"]
    assert [(e["reason"], e["dead_letter"]) for e in sent] == [("max_retries_exceeded", letter.id)]


def test_max_retries_zero_dead_letters_the_first_failure(app: Celery) -> None:
    name = unique("no-retries")
    runs: list[int] = []

    @resilient_task(app=app, name=name, max_retries=0, bind=False)
    def once(tenant_id: str = "t") -> None:
        runs.append(1)
        raise ConnectionError("down")

    once.apply(kwargs={"tenant_id": "t-kw"}).get(propagate=False)
    assert len(runs) == 1
    (letter,) = letters(app, name)
    assert (letter.retries, letter.tenant_id) == (0, "t-kw")


def test_a_poison_pill_goes_to_the_dlq_at_once_with_its_reason(app: Celery) -> None:
    name = unique("poison")
    runs: list[int] = []

    @resilient_task(app=app, name=name)
    def parse(self: object, body: str) -> None:
        runs.append(1)
        json.loads(body)

    parse.apply(args=("{not json",)).get(propagate=False)
    assert len(runs) == 1
    (letter,) = letters(app, name)
    assert letter.reason.value == "poison_pill"
    assert letter.retries == 0
    assert letter.error_type == "JSONDecodeError"
    assert letter.error.startswith("malformed JSON: Expecting property name")


def test_without_poison_detection_a_value_error_is_retried(app: Celery) -> None:
    name = unique("no-detection")
    runs: list[int] = []

    @resilient_task(app=app, name=name, poison_pill_detection=False, max_retries=1)
    def parse(self: object) -> None:
        runs.append(1)
        raise ValueError("bad")

    parse.apply().get(propagate=False)
    assert len(runs) == 2
    (letter,) = letters(app, name)
    assert letter.reason.value == "max_retries_exceeded"


def test_without_dlq_routing_the_error_is_raised(app: Celery) -> None:
    poison_name, transient_name = unique("raise-poison"), unique("raise-transient")

    @resilient_task(app=app, name=poison_name, dlq_routing=False)
    def poison(self: object) -> None:
        raise KeyError("missing")

    @resilient_task(app=app, name=transient_name, dlq_routing=False, max_retries=0)
    def transient(self: object) -> None:
        raise ConnectionError("down")

    with pytest.raises(KeyError):
        poison.apply().get()
    with pytest.raises(ConnectionError):
        transient.apply().get()
    assert letters(app, poison_name) == []
    assert letters(app, transient_name) == []


def test_retry_after_is_honoured_and_the_floor_is_one_second(app: Celery) -> None:
    name = unique("retry-after")
    runs: list[int] = []

    @resilient_task(app=app, name=name, backoff_base=0.001, backoff_max=0.002)
    def limited(self: object) -> str:
        runs.append(1)
        if len(runs) == 1:
            raise LLMHTTPStatusError(429, "slow down", retry_after=30.0)
        if len(runs) == 2:
            raise ConnectionError("reset")
        return "ok"

    with capture_logs() as logs:
        assert limited.apply().get(propagate=False) == "ok"
    assert [e["countdown"] for e in retried(logs)] == [30.0, 1.0]


def test_an_open_circuit_defers_within_its_own_budget(app: Celery) -> None:
    name = unique("deferred")
    runs: list[int] = []
    before = metric("messages_sent_to_dlq_total", reason="max_deferrals_exceeded")

    @resilient_task(app=app, name=name, max_deferrals=2, max_retries=0)
    def needs_llm(self: object) -> None:
        runs.append(1)
        raise CircuitOpenError("llm", retry_after=5.0)

    with capture_logs() as logs:
        needs_llm.apply(task_id="m-deferred").get(propagate=False)
    assert len(runs) == 3  # put off twice, no retry budget spent, then the DLQ
    assert retried(logs) == []
    (letter,) = letters(app, name)
    assert letter.reason.value == "max_deferrals_exceeded"
    assert letter.retries == 2
    assert metric("messages_sent_to_dlq_total", reason="max_deferrals_exceeded") == before + 1


def test_a_conflicting_message_id_is_dead_lettered_without_retries(app: Celery) -> None:
    name = unique("conflict")

    @resilient_task(app=app, name=name)
    def claims(self: object) -> None:
        try:
            raise ConflictingMessageIdError("committed for another payload")
        except ConflictingMessageIdError as exc:
            raise RuntimeError("the effect failed") from exc

    claims.apply().get(propagate=False)
    (letter,) = letters(app, name)
    assert (letter.reason.value, letter.retries) == ("conflicting_message_id", 0)


def test_one_letter_per_fate_and_the_hook_sees_each(app: Celery) -> None:
    name = unique("marker")
    hooked: list[DeadLetter] = []

    async def hook(letter: DeadLetter) -> None:
        hooked.append(letter)

    @resilient_task(app=app, name=name, on_dead_letter=hook)
    def poison(self: object, data: dict[str, Any]) -> None:
        data["missing"]

    with capture_logs() as logs:
        poison.apply(args=({"a": 1},), task_id="m-marker").get(propagate=False)
        poison.apply(args=({"a": 1},), task_id="m-marker").get(propagate=False)  # a redelivery
    assert len(letters(app, name)) == 1
    assert [x.message_id for x in hooked] == ["m-marker", "m-marker"]
    assert hooked[0].error == "missing required key 'missing'"
    assert hooked[1].reason.value == "poison_pill"
    # each delivery writes its letter (no Redis marker decides); the store keeps one
    assert [e["event"] for e in logs if "dead" in e["event"]] == [
        "message sent to the dead-letter queue",
        "message sent to the dead-letter queue",
    ]
    assert DEFER_PREFIX == "defer_count:"


def test_a_failing_hook_is_logged_and_changes_nothing(app: Celery) -> None:
    name = unique("bad-hook")

    async def hook(letter: DeadLetter) -> None:
        raise RuntimeError("hook broke")

    @resilient_task(app=app, name=name, on_dead_letter=hook)
    def poison(self: object) -> None:
        raise TypeError("wrong")

    with capture_logs() as logs:
        poison.apply().get(propagate=False)
    assert len(letters(app, name)) == 1
    assert [e["log_level"] for e in logs if e["event"] == "on_dead_letter hook failed"] == ["error"]


class FakeInbox:
    def __init__(self, entries: dict[str, InboxEntry]) -> None:
        self.entries = entries

    async def lookup(self, message_id: str) -> InboxEntry | None:
        return self.entries.get(message_id)


def test_the_inbox_settles_committed_twins_and_conflicts_before_they_run(app: Celery) -> None:
    name = unique("inbox")
    runs: list[int] = []
    duplicates: list[tuple[Any, ...]] = []

    async def on_duplicate(*args: Any) -> None:
        duplicates.append(args)

    inbox = FakeInbox({})

    @resilient_task(app=app, name=name, inbox=inbox, on_duplicate=on_duplicate)
    def effect(self: object, n: int) -> str:
        runs.append(n)
        return "ran"

    assert effect.apply(args=(1,), task_id="m-new").get(propagate=False) == "ran"
    inbox.entries["m-twin"] = InboxEntry(fingerprint=None)  # committed, any payload
    with capture_logs() as logs:
        assert effect.apply(args=(2,), task_id="m-twin").get(propagate=False) is None
    assert runs == [1]
    assert duplicates == [(2,)]
    assert [e["event"] for e in logs] == [
        "effect already committed; delivery acked without running"
    ]
    inbox.entries["m-other"] = InboxEntry(fingerprint="another payload's")
    conflict = effect.apply(args=(3,), task_id="m-other").get(propagate=False)
    assert isinstance(conflict, DeadLettered)  # Celery's FAILURE: never "succeeded"
    assert conflict.reason == "conflicting_message_id"
    assert runs == [1]
    (letter,) = letters(app, name)
    assert (letter.message_id, letter.reason.value) == ("m-other", "conflicting_message_id")


class UpperRng:
    """``uniform(a, b)`` is ``b``: each backoff is its ceiling, exactly."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_the_default_backoff_doubles_from_one_second_to_sixty(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aura.messaging._runtime import process_runtime

    monkeypatch.setattr(process_runtime(app), "rng", UpperRng())
    name = unique("backoff")

    @resilient_task(app=app, name=name, max_retries=8)
    def always_fails(self: object) -> None:
        raise ConnectionError("down")

    with capture_logs() as logs:
        always_fails.apply().get(propagate=False)
    countdowns = [e["countdown"] for e in retried(logs)]
    assert countdowns == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert backoff_delay(3, base=1.0, cap=60.0, rng=UpperRng()) == 4.0  # type: ignore[arg-type]


def test_thirty_deferrals_by_default(app: Celery) -> None:
    name = unique("thirty")
    runs: list[int] = []

    @resilient_task(app=app, name=name)
    def needs_llm(self: object) -> None:
        runs.append(1)
        raise CircuitOpenError("llm", retry_after=0.0)

    needs_llm.apply().get(propagate=False)
    assert len(runs) == 31
    (letter,) = letters(app, name)
    assert letter.reason.value == "max_deferrals_exceeded"


def test_registration_binding_and_signature(app: Celery) -> None:
    @resilient_task(app=app)
    def bound(self: Any, n: int, *, tenant_id: str = "t") -> str:
        return str(self.request.id)

    name = f"{__name__}.test_registration_binding_and_signature.<locals>.bound"
    assert bound.name == name
    assert name in app.tasks
    assert list(bound.aura_signature.parameters) == ["n", "tenant_id"]
    assert bound.apply(args=(1,), task_id="m-bound").get(propagate=False) == "m-bound"

    @resilient_task(app=app, bind=False, name=unique("unbound"))
    def unbound(n: int) -> int:
        return n + 1

    assert list(unbound.aura_signature.parameters) == ["n"]
    assert unbound.apply(args=(1,)).get(propagate=False) == 2


def test_past_the_hard_time_limit_the_message_is_requeued(app: Celery) -> None:
    from celery.exceptions import Reject

    from aura.messaging._runtime import HardTimeLimitExceeded

    @resilient_task(app=app, name=unique("hard"))
    def stuck(self: object) -> None:
        raise HardTimeLimitExceeded

    before = metric("celery_task_timeouts_total", kind="hard")
    with pytest.raises(Reject) as rejected:
        stuck.run()
    assert rejected.value.requeue is True
    assert metric("celery_task_timeouts_total", kind="hard") == before + 1


def test_the_process_loop_is_the_runtimes(app: Celery) -> None:
    import asyncio

    from aura.messaging._runtime import process_runtime
    from aura.messaging._task import process_loop

    loop = process_loop(app)
    assert isinstance(loop, asyncio.AbstractEventLoop)
    assert loop is process_runtime(app).loop
    assert process_loop(Celery("another")) is loop  # one runtime per process, whichever app


def test_the_task_class_keeps_requests_per_context(app: Celery) -> None:
    from aura.messaging._runtime import ContextStack

    @resilient_task(app=app, name=unique("stack"))
    def noop(self: object) -> None:
        return None

    assert isinstance(noop.request_stack, ContextStack)


def test_an_async_task_runs_on_the_process_loop(app: Celery) -> None:
    import asyncio

    from aura.messaging._task import process_loop

    @resilient_task(app=app, name=unique("async"))
    async def coroutine(self: object, n: int) -> int:
        assert asyncio.get_running_loop() is process_loop(app)
        return n * 2

    assert coroutine.apply(args=(21,)).get(propagate=False) == 42


def test_a_soft_time_limit_is_counted_and_retried(app: Celery) -> None:
    from billiard.exceptions import SoftTimeLimitExceeded

    runs: list[int] = []

    @resilient_task(app=app, name=unique("soft"))
    def slow(self: object) -> str:
        runs.append(1)
        if len(runs) == 1:
            raise SoftTimeLimitExceeded
        return "done"

    before = metric("celery_task_timeouts_total", kind="soft")
    assert slow.apply().get(propagate=False) == "done"
    assert metric("celery_task_timeouts_total", kind="soft") == before + 1


def run_redelivered(task: Any, message_id: str) -> Any:
    """Run ``task`` as a redelivery of ``message_id`` (eager apply cannot say so)."""
    task.push_request(id=message_id, delivery_info={"redelivered": True}, retries=0, args=())
    try:
        return task.run()
    finally:
        task.pop_request()


def test_a_redelivery_counts_against_the_budget(app: Celery) -> None:
    from aura.messaging._retry import KEY_PREFIX
    from aura.messaging._runtime import process_runtime

    name = unique("redelivered")
    runs: list[int] = []

    @resilient_task(app=app, name=name, max_retries=1)
    def effect(self: object) -> str:
        runs.append(1)
        return "ran"

    runtime = process_runtime(app)
    message_id = f"m-{uuid.uuid4().hex}"
    assert run_redelivered(effect, message_id) == "ran"  # its first crash: within budget
    assert runs == [1]
    assert runtime.run(runtime.redis.exists(KEY_PREFIX + message_id)) == 0  # cleared

    runtime.run(runtime.redis.set(KEY_PREFIX + message_id, 1))  # one failure counted
    with pytest.raises(DeadLettered):  # the crash spends the budget
        run_redelivered(effect, message_id)
    assert runs == [1]
    (letter,) = letters(app, name)
    assert (letter.reason.value, letter.retries, letter.error_type) == (
        "worker_lost",
        1,
        "WorkerLostError",
    )
    assert runtime.run(runtime.redis.exists(KEY_PREFIX + message_id)) == 0  # cleared


class CountingInbox(FakeInbox):
    def __init__(self, entries: dict[str, InboxEntry], fails: int = 0) -> None:
        super().__init__(entries)
        self.lookups = 0
        self.fails = fails

    async def lookup(self, message_id: str) -> InboxEntry | None:
        self.lookups += 1
        if self.fails:
            self.fails -= 1
            # not an outage (tests/messaging/test_db_outage_deferral.py has those): an inbox that
            # cannot be read for a reason of its own
            raise RuntimeError("inbox down " + "x" * 1000)
        return await super().lookup(message_id)


def test_an_unreadable_inbox_lets_the_delivery_run(app: Celery) -> None:
    runs: list[int] = []
    inbox = CountingInbox({}, fails=1)

    @resilient_task(app=app, name=unique("inbox-down"), inbox=inbox)
    def effect(self: object) -> str:
        runs.append(1)
        return "ran"

    with capture_logs() as logs:
        assert effect.apply().get(propagate=False) == "ran"
    assert runs == [1]
    (warning,) = [e for e in logs if e["event"].startswith("inbox lookup failed")]
    assert warning["event"] == "inbox lookup failed; the delivery runs and its claim decides"
    assert len(warning["error"]) == 300


def test_a_conflict_found_by_the_inbox_costs_one_lookup(app: Celery) -> None:
    name = unique("conflict-lookups")
    inbox = CountingInbox({"m-c": InboxEntry(fingerprint="another")})

    @resilient_task(app=app, name=name, inbox=inbox)
    def effect(self: object) -> None:
        raise AssertionError("never runs")

    assert isinstance(effect.apply(task_id="m-c").get(propagate=False), DeadLettered)
    assert inbox.lookups == 1
    (letter,) = letters(app, name)
    assert (letter.reason.value, letter.retries) == ("conflicting_message_id", 0)


def test_a_committed_twin_clears_counters_and_a_failed_recovery_is_retried(app: Celery) -> None:
    from aura.messaging._retry import KEY_PREFIX
    from aura.messaging._runtime import process_runtime

    runtime = process_runtime(app)
    recoveries: list[int] = []

    async def on_duplicate() -> None:
        recoveries.append(1)
        if len(recoveries) == 1:
            raise ConnectionError("queue down")

    inbox = CountingInbox({"m-twin2": InboxEntry(fingerprint=None)})

    @resilient_task(app=app, name=unique("twin"), inbox=inbox, on_duplicate=on_duplicate)
    def effect(self: object) -> None:
        raise AssertionError("never runs")

    runtime.run(runtime.redis.set(DEFER_PREFIX + "m-twin2", 3))
    before = metric("aura_duplicate_deliveries_total", kind="committed")
    with capture_logs() as logs:
        assert effect.apply(task_id="m-twin2").get(propagate=False) is None
    assert recoveries == [1, 1]  # the failed recovery step was retried, then done
    assert [e["attempt"] for e in retried(logs)] == [1]
    assert metric("aura_duplicate_deliveries_total", kind="committed") == before + 1
    assert runtime.run(runtime.redis.exists(DEFER_PREFIX + "m-twin2")) == 0
    assert runtime.run(runtime.redis.exists(KEY_PREFIX + "m-twin2")) == 0


def test_counters_are_cleared_after_a_success_and_redis_failing_there_is_only_logged(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aura.messaging._retry import KEY_PREFIX
    from aura.messaging._runtime import process_runtime

    runtime = process_runtime(app)
    runs: list[int] = []

    @resilient_task(app=app, name=unique("clears"))
    def flaky(self: object) -> str:
        runs.append(1)
        if len(runs) % 2:
            raise ConnectionError("reset")
        return "done"

    assert flaky.apply(task_id="m-clears").get(propagate=False) == "done"
    assert runtime.run(runtime.redis.exists(KEY_PREFIX + "m-clears")) == 0

    async def refuse(*keys: str) -> int:
        raise ConnectionError("redis down " + "y" * 1000)

    monkeypatch.setattr(runtime.redis, "delete", refuse)
    with capture_logs() as logs:
        assert flaky.apply(task_id="m-clears-2").get(propagate=False) == "done"
    (warning,) = [e for e in logs if e["event"].startswith("could not clear")]
    assert warning["event"] == "could not clear the retry counters; their TTL ends them"
    assert len(warning["error"]) == 300


def test_a_redelivery_that_cannot_be_counted_runs(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis.exceptions

    from aura.messaging._runtime import process_runtime

    runtime = process_runtime(app)
    runs: list[int] = []

    @resilient_task(app=app, name=unique("uncounted"), max_retries=1)
    def effect(self: object) -> str:
        runs.append(1)
        return "ran"

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise redis.exceptions.ResponseError("OOM " + "z" * 1000)

    monkeypatch.setattr(runtime.redis, "pipeline", refuse)
    with capture_logs() as logs:
        assert run_redelivered(effect, f"m-{uuid.uuid4().hex}") == "ran"
    assert runs == [1]
    # Redis refusing (OOM) is Redis unable to help, like Redis down: the delivery's own
    # count stands in (aura.redis_errors), and within the budget it runs
    (warning,) = [e for e in logs if "cannot reach Redis" in e["event"]]
    assert "OOM" in warning["error"]


class LateInbox(CountingInbox):
    """Empty when the delivery is settled before it runs; holds ``entry`` afterwards (a
    twin committed meanwhile), or fails from the second lookup on."""

    def __init__(self, entry: InboxEntry | None, *, fail_late: bool = False) -> None:
        super().__init__({})
        self.entry = entry
        self.fail_late = fail_late

    async def lookup(self, message_id: str) -> InboxEntry | None:
        self.lookups += 1
        if self.lookups == 1:
            return None
        if self.fail_late:  # not an outage (those are put off before the run)
            raise RuntimeError("inbox down")
        return self.entry


def test_no_dead_letter_for_an_effect_the_inbox_shows_committed(app: Celery) -> None:
    from aura.messaging._retry import KEY_PREFIX
    from aura.messaging._runtime import process_runtime

    runtime = process_runtime(app)
    name = unique("late-twin")

    @resilient_task(app=app, name=name, inbox=LateInbox(InboxEntry(fingerprint=None)))
    def effect(self: object) -> None:
        raise KeyError("poison, but a twin committed the effect")

    runtime.run(runtime.redis.set(KEY_PREFIX + "m-late", 2))
    before = metric("aura_duplicate_deliveries_total", kind="committed")
    with capture_logs() as logs:
        assert effect.apply(task_id="m-late").get(propagate=False) is None
    assert letters(app, name) == []
    assert metric("aura_duplicate_deliveries_total", kind="committed") == before + 1
    assert [e["event"] for e in logs] == ["effect already committed; acked, not dead-lettered"]
    assert logs[0]["reason"] == "poison_pill"
    assert runtime.run(runtime.redis.exists(KEY_PREFIX + "m-late")) == 0

    other = unique("late-none")

    @resilient_task(app=app, name=other, inbox=LateInbox(None))
    def uncommitted(self: object) -> None:
        raise KeyError("poison")

    uncommitted.apply(task_id="m-late-none").get(propagate=False)
    assert [x.reason.value for x in letters(app, other)] == ["poison_pill"]


def test_an_unreadable_inbox_puts_a_dead_letter_off_within_the_deferral_budget(
    app: Celery,
) -> None:
    name = unique("late-unreadable")
    runs: list[int] = []

    @resilient_task(app=app, name=name, inbox=LateInbox(None, fail_late=True), max_deferrals=1)
    def effect(self: object) -> None:
        runs.append(1)
        raise KeyError("poison")

    with capture_logs() as logs:
        effect.apply(task_id=f"m-{uuid.uuid4().hex}").get(propagate=False)
    assert len(runs) == 2  # put off once, then dead-lettered
    events_said = [e["event"] for e in logs if "inbox" in e["event"]]
    assert events_said == [
        "inbox unreadable: cannot tell whether the effect is committed; put off",
        "inbox lookup failed; the delivery runs and its claim decides",
        "inbox unreadable and deferrals spent; dead-lettering",
    ]
    (letter,) = letters(app, name)
    assert letter.reason.value == "poison_pill"


def test_no_redis_marker_decides_a_letter(app: Celery) -> None:
    """A replayed message that fails again is dead-lettered again (a marker acked it away)."""
    from aura.messaging._runtime import process_runtime

    runtime = process_runtime(app)
    name = unique("no-marker")

    @resilient_task(app=app, name=name)
    def poison(self: object, n: int) -> None:
        raise KeyError("k")

    poison.apply(args=(1,), task_id="m-mark").get(propagate=False)
    assert runtime.run(runtime.redis.keys("dlq_written:*")) == []
    poison.apply(args=(1,), task_id="m-mark", headers={"aura_replay_count": 1}).get(propagate=False)
    (letter,) = letters(app, name)
    assert letter.replay_count == 1  # the replayed failure, newest, with its count


def test_a_task_belongs_to_the_app_it_names_else_to_auras(app: Celery) -> None:
    from aura.worker.celery_app import celery_app

    @resilient_task(app=app, name=unique("mine"))
    def mine(self: object) -> None:
        return None

    @resilient_task(name=unique("default"))
    def default(self: object) -> None:
        return None

    assert mine.app is app
    assert default.app is celery_app


def test_retries_and_deferrals_are_counted_and_counters_cleared_at_the_dlq(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aura.messaging._retry import KEY_PREFIX
    from aura.messaging._runtime import process_runtime

    runtime = process_runtime(app)
    monkeypatch.setattr(runtime, "rng", random.Random(1))
    retries = metric("aura_task_retries_total", kind="retry")
    deferrals = metric("aura_task_retries_total", kind="deferral")

    @resilient_task(app=app, name=unique("counted"), max_retries=2)
    def fails(self: object) -> None:
        raise ConnectionError("down")

    @resilient_task(app=app, name=unique("deferred2"), max_deferrals=3)
    def deferred(self: object) -> None:
        raise CircuitOpenError("llm", retry_after=0.0)

    with capture_logs() as logs:
        fails.apply(task_id="m-counted").get(propagate=False)
    deferred.apply().get(propagate=False)
    assert metric("aura_task_retries_total", kind="retry") == retries + 2
    assert metric("aura_task_retries_total", kind="deferral") == deferrals + 3
    assert runtime.run(runtime.redis.exists(KEY_PREFIX + "m-counted")) == 0
    countdowns = [e["countdown"] for e in retried(logs)]
    assert all(c == round(c, 3) for c in countdowns)  # logged to the millisecond
    assert any(c != round(c, 2) for c in countdowns)


def test_a_marker_redis_cannot_read_means_the_letter_is_written(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aura.messaging._runtime import process_runtime

    runtime = process_runtime(app)
    name = unique("marker-down")

    async def refuse(*keys: str) -> int:
        raise ConnectionError("redis down")

    monkeypatch.setattr(runtime.redis, "exists", refuse)

    @resilient_task(app=app, name=name)
    def poison(self: object) -> None:
        raise KeyError("k")

    poison.apply().get(propagate=False)
    assert len(letters(app, name)) == 1


def test_a_conflict_raised_by_the_claim_asks_the_inbox_no_more(app: Celery) -> None:
    inbox = LateInbox(None)
    name = unique("claim-conflict")

    @resilient_task(app=app, name=name, inbox=inbox)
    def claims(self: object) -> None:
        raise ConflictingMessageIdError("committed for another payload")

    claims.apply().get(propagate=False)
    assert inbox.lookups == 1  # the settling lookup only
    assert [x.reason.value for x in letters(app, name)] == ["conflicting_message_id"]


def test_when_redis_cannot_count_deferrals_celerys_count_bounds_them(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis.exceptions

    from aura.messaging._runtime import process_runtime

    runtime = process_runtime(app)
    name = unique("deferrals-uncounted")
    runs: list[int] = []

    class LongFailure(LateInbox):
        async def lookup(self, message_id: str) -> InboxEntry | None:
            self.lookups += 1
            if self.lookups == 1:
                return None
            # not an outage (tests/messaging/test_db_outage_deferral.py has those): an inbox that
            # cannot be read for a reason of its own
            raise RuntimeError("inbox down " + "x" * 1000)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise redis.exceptions.ResponseError("OOM")

    @resilient_task(app=app, name=name, inbox=LongFailure(None), max_deferrals=1)
    def effect(self: object) -> None:
        runs.append(1)
        raise KeyError("poison")

    monkeypatch.setattr(runtime.redis, "pipeline", refuse)
    with capture_logs() as logs:
        effect.apply().get(propagate=False)
    assert len(runs) == 2  # put off once (Celery's retries: 0 < 1), then dead-lettered
    (spent,) = [e for e in logs if e["event"].endswith("deferrals spent; dead-lettering")]
    assert len(spent["error"]) == 300
    assert [x.reason.value for x in letters(app, name)] == ["poison_pill"]


def test_lookup_first_false_runs_without_reading_the_inbox_and_the_claim_decides(
    app: Celery,
) -> None:
    """A task whose statement claims its id: no read before it runs; its twin is counted
    as the read's would be; the inbox is still read before a dead letter, and an id it
    shows committed for another payload is a conflict, however the delivery failed."""
    from aura.messaging import report_duplicate

    inbox = CountingInbox({})
    runs: list[str] = []

    @resilient_task(app=app, name=unique("claims"), inbox=inbox, lookup_first=False)
    def claims(self: Any, twin: bool) -> str:
        runs.append(self.request.id)
        if twin:
            report_duplicate(self)
        return "ok"

    before = metric("aura_duplicate_deliveries_total", kind="committed")
    with capture_logs() as logs:
        assert claims.apply(args=(False,), task_id="m-claims-1").get(propagate=False) == "ok"
        assert claims.apply(args=(True,), task_id="m-claims-2").get(propagate=False) == "ok"
    assert (inbox.lookups, runs) == (0, ["m-claims-1", "m-claims-2"])
    assert metric("aura_duplicate_deliveries_total", kind="committed") == before + 1
    (twin,) = [e for e in logs if e["event"].startswith("effect already committed")]
    assert (twin["event"], twin["message_id"]) == (
        "effect already committed; the delivery's claim found it",
        "m-claims-2",
    )

    name = unique("claims-poison")
    conflicted = CountingInbox({"m-reused": InboxEntry(fingerprint="another payload")})

    @resilient_task(app=app, name=name, inbox=conflicted, lookup_first=False)
    def poisoned(self: object) -> None:
        raise KeyError("poison under an id committed for another payload")

    poisoned.apply(task_id="m-reused").get(propagate=False)
    poisoned.apply(task_id="m-fresh").get(propagate=False)
    assert conflicted.lookups == 2  # before each dead letter, never before a run
    reasons = {x.message_id: x.reason.value for x in letters(app, name)}
    assert reasons == {"m-reused": "conflicting_message_id", "m-fresh": "poison_pill"}
