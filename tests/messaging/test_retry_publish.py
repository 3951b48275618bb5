"""A retry that cannot be published puts its message back (``aura.messaging._task._retry``):
Celery's own answer, ``Reject(requeue=False)``, dead-letters a message whose effect may be
committed (``aura chaos partition-broker`` lost an enrichment that way)."""

from __future__ import annotations

from typing import Any

import pytest
from celery.exceptions import Reject, Retry

from aura.messaging._settle import retry as _retry


class _Task:
    def __init__(self, failure: BaseException) -> None:
        self.failure = failure
        self.calls: list[dict[str, Any]] = []

    def retry(self, **kwargs: Any) -> Retry:
        self.calls.append(kwargs)
        raise self.failure


def test_a_retry_whose_publish_failed_is_requeued_not_dead_lettered() -> None:
    cause = ConnectionError("the broker is unreachable")
    task = _Task(Reject(OSError("timed out"), requeue=False))
    with pytest.raises(Reject) as raised:
        _retry(task, cause, 2.0)  # type: ignore[arg-type]
    assert raised.value.requeue is True
    assert raised.value.__cause__ is cause
    assert task.calls == [{"exc": cause, "countdown": 2.0, "headers": {"aura_failures": 0}}]


def test_a_published_retry_and_a_requeue_pass_through() -> None:
    for failure in (Retry("published"), Reject("back", requeue=True)):
        task = _Task(failure)
        with pytest.raises(type(failure)) as raised:
            _retry(task, ValueError("x"), 1.0)  # type: ignore[arg-type]
        assert raised.value is failure
