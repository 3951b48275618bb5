"""Idempotency: a message id names one payload, and its effect happens once.

A task with an ``inbox`` (``resilient_task(inbox=...)``) has each delivery looked up
before it runs, by message id, and compared by payload fingerprint::

    inbox says                        the delivery
    nothing committed                 runs (its claim, in the effect's transaction,
                                      settles a race with a twin running at once)
    committed, same fingerprint       acked without running: no external call, no
                                      effect (``on_duplicate`` may redo recovery steps)
    committed, other fingerprint      DLQ ``conflicting_message_id`` (never a silent ack)

The fingerprint is the SHA-256 of the task name, positional and keyword arguments as
canonical JSON (sorted keys, no spaces). An inbox row written before fingerprints were
kept has none and matches any payload. The same lookup runs before any dead letter is
written, so a message whose effect is committed is never also dead-lettered.
"""

from __future__ import annotations

from typing import Any, Protocol

from aura.message_id import InboxEntry, message_fingerprint

__all__ = ["Inbox", "InboxEntry", "delivery_fingerprint", "message_fingerprint"]


class Inbox(Protocol):
    """Where a task's committed message ids are kept (``aura.db.DatabaseInbox``)."""

    async def lookup(self, message_id: str) -> InboxEntry | None:
        """The committed entry for ``message_id``, or None if nothing is committed."""
        ...


def delivery_fingerprint(task: Any) -> str:
    """The fingerprint of the delivery ``task`` (a bound Celery task) is running, for its
    inbox claim: ``claim_message(..., fingerprint=delivery_fingerprint(self))``."""
    known = getattr(task.request, "aura_fingerprint", None)
    if isinstance(known, str):
        return known
    return message_fingerprint(task.name, task.request.args or (), task.request.kwargs or {})
