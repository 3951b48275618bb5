"""Retry and deferral counters end with their message's fate: a success after retries
or deferrals removes them, as does a twin settled by the inbox."""

from __future__ import annotations

import uuid
from typing import Any

from aura.config import load_settings
from aura.errors import CircuitOpenError
from aura.messaging import resilient_task
from aura.messaging.retry import KEY_PREFIX
from aura.messaging.runtime import process_runtime
from aura.messaging.task import DEFER_PREFIX
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
