"""Retry and deferral counters end with their message's fate: a success after retries
or deferrals removes them, as does a twin settled by the inbox."""

from __future__ import annotations

import uuid
from typing import Any

from aura.config import load_settings
from aura.errors import CircuitOpenError, DeadLettered
from aura.messaging import resilient_task
from aura.messaging._retry import KEY_PREFIX
from aura.messaging._runtime import process_runtime
from aura.messaging._task import DEFER_PREFIX
from aura.worker.celery_app import make_celery_app


def _counters(app: Any, message_id: str) -> list[str]:
    runtime = process_runtime(app)

    async def read() -> list[str]:
        keys = [KEY_PREFIX + message_id, DEFER_PREFIX + message_id]
        return [key for key in keys if await runtime.redis.exists(key)]

    found: list[str] = runtime.run(read())
    return found


def test_a_success_after_deferrals_and_retries_leaves_no_counter() -> None:
    app = make_celery_app(load_settings())  # in-memory broker, embedded Redis; eager
    app.conf.task_always_eager = True
    runs: list[int] = []
    seen: list[list[str]] = []

    @resilient_task(app=app, name="tests.stale_mix", backoff_base=1.0, backoff_max=1.0)
    def mixed(self: Any) -> str:
        runs.append(1)
        seen.append(_counters(app, self.request.id))
        if len(runs) <= 2:
            raise CircuitOpenError("llm", retry_after=0.0)
        if len(runs) == 3:
            raise ConnectionError("reset")
        return "done"

    message_id = str(uuid.uuid4())
    assert mixed.apply(task_id=message_id).get() == "done"
    assert seen[2] == [DEFER_PREFIX + message_id]  # counted while it was put off
    assert KEY_PREFIX + message_id in seen[3]
    assert _counters(app, message_id) == []  # and gone with its fate


def test_a_message_dead_lettered_after_its_deferrals_leaves_no_counter() -> None:
    """The DLQ is a fate too: deferrals spent (an LLM down for good) end in a letter and
    no counter, so `aura retries ls --kind defer` does not list it for a day."""
    app = make_celery_app(load_settings())
    app.conf.task_always_eager = True
    seen: list[list[str]] = []

    @resilient_task(app=app, name="tests.stale_deferred", max_deferrals=2)
    def always_open(self: Any) -> None:
        seen.append(_counters(app, self.request.id))
        raise CircuitOpenError("llm", retry_after=0.0)

    message_id = str(uuid.uuid4())
    # dead-lettered, acked: Celery's FAILURE with DeadLettered, never "succeeded"
    assert isinstance(always_open.apply(task_id=message_id).get(propagate=False), DeadLettered)
    assert [DEFER_PREFIX + message_id] in seen  # it was counted while put off
    assert _counters(app, message_id) == []


def test_a_message_dead_lettered_after_its_retries_leaves_no_counter() -> None:
    app = make_celery_app(load_settings())
    app.conf.task_always_eager = True
    seen: list[list[str]] = []

    @resilient_task(
        app=app, name="tests.stale_failed", max_retries=2, backoff_base=1.0, backoff_max=1.0
    )
    def always_failing(self: Any) -> None:
        seen.append(_counters(app, self.request.id))
        raise ConnectionError("reset")

    message_id = str(uuid.uuid4())
    assert isinstance(always_failing.apply(task_id=message_id).get(propagate=False), DeadLettered)
    assert [KEY_PREFIX + message_id] in seen
    assert _counters(app, message_id) == []
