"""``ResilientRequest``: how a worker settles a delivery whose fate was the DLQ.

A resilient task whose delivery ends in the DLQ raises ``DeadLettered`` once its letter
is confirmed there. Celery's tracer then does what it does for any failure -- state
FAILURE in the result backend (when results are kept), the ``task_failure`` signal, a
``task-failed`` event (Flower), the log line "raised expected" (``Task.throws``: no
traceback) -- where a returned ``None`` was logged "succeeded" with state SUCCESS.

Only the message's last step differs, and it is why this class exists: Celery answers a
failure of an ``acks_late`` task with ``task_acks_on_failure_or_timeout=False`` (Aura's
setting, so that an unexpected error is never acked away) by rejecting the message, and a
rejected message on a work queue is dead-lettered by the broker -- a second letter, with
no reason. A ``DeadLettered`` failure is acked instead: its letter is already safe.

Checked in Celery 5.7's source (``celery/worker/request.py``, ``celery/app/trace.py``):
``Ignore`` would ack too, but its state is IGNORED and no signal fires; ``Reject`` with
``requeue=False`` records FAILURE and fires ``task_failure`` but rejects the message.
"""

from __future__ import annotations

from typing import Any

from billiard.einfo import ExceptionWithTraceback
from celery.utils.serialization import get_pickled_exception
from celery.worker.request import Request, task_ready
from kombu.utils.encoding import safe_repr

from aura.errors import DeadLettered

__all__ = ["ResilientRequest", "is_dead_lettered"]


def is_dead_lettered(exc: BaseException) -> bool:
    """``DeadLettered``, or its stand-in after a trip between processes (prefork)."""
    if isinstance(exc, ExceptionWithTraceback):
        exc = exc.exc
    exc = get_pickled_exception(exc)
    return isinstance(exc, DeadLettered) or getattr(exc, "exc_cls_name", None) == "DeadLettered"


class ResilientRequest(Request):  # type: ignore[misc]
    """Celery's request, except that a ``DeadLettered`` failure acks its message."""

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        if not is_dead_lettered(exc_info.exception):
            return super().on_failure(exc_info, send_failed_event, return_ok)
        task_ready(self)
        self.acknowledge()  # its letter is in the DLQ: rejected, the broker would add one
        if send_failed_event:
            self.send_event(
                "task-failed",
                exception=safe_repr(get_pickled_exception(exc_info.exception)),
                traceback=exc_info.traceback,
            )
        return None
