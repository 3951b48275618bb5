"""The fate engine's rules (``aura.messaging.rules``): the order is data, the first fate
decides, a user's rule goes in without editing Aura, a failing rule is skipped -- and
whatever a task's runs raise, each delivery ends in exactly one fate. Eager, in process
(Celery's in-memory broker and the embedded Redis stand-in), with the test's own tasks."""

from __future__ import annotations

import inspect
import itertools
import re
import uuid
from typing import Any

import pytest
from celery import Celery
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from aura.config import load_settings
from aura.errors import CircuitOpenError, ConfigurationError
from aura.events import CustomReason, DeadLetterReason
from aura.messaging import (
    DEFAULT_RULES,
    Ack,
    BaseRule,
    DeadLetter,
    DeadLetterAs,
    DeadLetterQueue,
    Delivery,
    Fail,
    Fate,
    resilient_task,
)
from aura.messaging import rules as rules_module
from aura.worker.celery_app import make_celery_app
from tests.helpers import metric

pytestmark = pytest.mark.filterwarnings("ignore::celery.exceptions.CDeprecationWarning")


@pytest.fixture(scope="module")
def app() -> Celery:
    app = make_celery_app(load_settings())  # in-memory broker; eager: retries run inline
    app.conf.task_always_eager = True
    return app


def unique(label: str) -> str:
    return f"tests.fate.{label}.{uuid.uuid4().hex[:8]}"


def letters(app: Celery, task: str) -> list[DeadLetter]:
    with app.connection_for_write() as connection:
        return DeadLetterQueue(connection).list(task=task, limit=1000)


class QuotaIsPoison(BaseRule):
    """A user's classifier: the provider's "quota exhausted" will not heal by retrying."""

    def on_failure(self, delivery: Delivery, error: Exception) -> Fate | None:
        if isinstance(error, ConnectionError) and "quota" in str(error):
            return DeadLetterAs(CustomReason("quota_exhausted"), error, 0, "quota exhausted")
        return None


def test_the_fate_table_lists_the_default_rules_in_their_order() -> None:
    table = inspect.getdoc(rules_module) or ""
    rows = re.findall(r"^\d+\s+(\w+)", table, flags=re.MULTILINE)
    assert rows == [type(rule).__name__ for rule in DEFAULT_RULES]


def test_a_users_rule_and_reason_go_in_without_editing_aura(app: Celery) -> None:
    name = unique("custom")
    runs: list[int] = []
    before = metric("messages_sent_to_dlq_total", reason="quota_exhausted")

    @resilient_task(app=app, name=name, rules=[QuotaIsPoison(), *DEFAULT_RULES])
    def call(self: object) -> None:
        runs.append(1)
        raise ConnectionError("quota exhausted for this key")

    call.apply(task_id="m-custom").get(propagate=False)
    assert len(runs) == 1  # no retry spent: the rule decided at once
    (letter,) = letters(app, name)
    assert (letter.reason, letter.error, letter.retries) == (
        "quota_exhausted",
        "quota exhausted",
        0,
    )
    assert isinstance(letter.reason, CustomReason)  # read back from the broker as one
    assert metric("messages_sent_to_dlq_total", reason="quota_exhausted") == before + 1
    with pytest.raises(ConfigurationError, match="snake_case"):
        CustomReason("Quota Exhausted!")  # a label value: bounded by shape


def test_the_first_fate_decides_and_no_later_rule_is_asked(app: Celery) -> None:
    name = unique("first")
    asked: list[str] = []

    class Records(BaseRule):
        def on_failure(self, delivery: Delivery, error: Exception) -> Fate | None:
            asked.append(delivery.message_id)
            return None

    @resilient_task(app=app, name=name, rules=[QuotaIsPoison(), Records(), *DEFAULT_RULES])
    def call(self: object, quota: bool) -> None:
        raise ConnectionError("quota" if quota else "reset")

    call.apply(args=(True,), task_id="m-decided").get(propagate=False)
    assert asked == []
    call.apply(args=(False,), task_id="m-asked").get(propagate=False)
    assert set(asked) == {"m-asked"}  # asked on every failure of the one not decided early


def test_a_failing_rule_is_logged_and_skipped(app: Celery) -> None:
    name = unique("broken-rule")
    runs: list[int] = []

    class Broken(BaseRule):
        def before(self, delivery: Delivery) -> Fate | None:
            raise RuntimeError("a bug in the rule")

    @resilient_task(app=app, name=name, rules=[Broken(), *DEFAULT_RULES])
    def call(self: object) -> str:
        runs.append(1)
        if len(runs) == 1:
            raise ConnectionError("reset")
        return "done"

    with capture_logs() as logs:
        assert call.apply().get() == "done"
    skipped = [e for e in logs if e["event"] == "a fate rule failed; skipped"]
    assert skipped
    assert all(e["rule"] == "Broken" for e in skipped)
    assert len(runs) == 2


def test_a_rule_before_the_run_settles_it_without_running(app: Celery) -> None:
    name = unique("before")
    runs: list[int] = []

    class AlreadyDone(BaseRule):
        def before(self, delivery: Delivery) -> Fate | None:
            return Ack(recover=False)

    class Refuse(BaseRule):
        def before(self, delivery: Delivery) -> Fate | None:
            return Fail(PermissionError("refused"))

    @resilient_task(app=app, name=name, rules=[AlreadyDone()])
    def done(self: object) -> None:
        runs.append(1)

    @resilient_task(app=app, name=unique("refused"), rules=[Refuse()])
    def refused(self: object) -> None:
        runs.append(1)

    assert done.apply().get() is None
    with pytest.raises(PermissionError):
        refused.apply().get()
    assert runs == []


_RUN = st.sampled_from(["ok", "transient", "poison", "breaker"])


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(script=st.lists(_RUN, min_size=1, max_size=12), max_retries=st.integers(0, 3))
def test_every_delivery_ends_in_exactly_one_fate(
    app: Celery, script: list[str], max_retries: int
) -> None:
    name = unique("fates")
    steps = itertools.chain(script, itertools.repeat("transient"))
    runs: list[str] = []

    @resilient_task(app=app, name=name, max_retries=max_retries, max_deferrals=3)
    def scripted(self: object) -> str:
        step = next(steps)
        runs.append(step)
        if step == "transient":
            raise ConnectionError("reset")
        if step == "poison":
            raise KeyError("missing")
        if step == "breaker":
            raise CircuitOpenError("llm", retry_after=1.0)
        return "done"

    result: Any = scripted.apply(task_id=f"m-{uuid.uuid4().hex}").get(propagate=False)
    dead = letters(app, name)
    assert (result == "done") != (len(dead) == 1)  # committed, or one letter: never both
    assert len(dead) <= 1
    assert runs.count("transient") <= max_retries + 1
    assert runs.count("breaker") <= 3 + 1
    if result == "done":
        assert runs[-1] == "ok"
    elif runs[-1] == "poison":
        assert dead[0].reason == DeadLetterReason.POISON_PILL
    elif runs[-1] == "breaker":
        assert dead[0].reason == DeadLetterReason.MAX_DEFERRALS_EXCEEDED
    else:
        assert dead[0].reason == DeadLetterReason.MAX_RETRIES_EXCEEDED
