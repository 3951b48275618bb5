"""Message processing (seed patterns 3-5): poison pills, retry tracking, the DLQ and
``@resilient_task``.

    PoisonPillDetector   is_poison_pill / get_poison_reason
    RetryTracker         increment_and_check, one Redis round trip, ``retry_count:{id}``
    route_to_dlq         publish a dead letter with a confirm, then count it
    DeadLetterQueue      list / show / replay / purge (``aura dlq``)
    resilient_task       the Celery task decorator, for ``def`` and ``async def``
    Rule, DEFAULT_RULES  a delivery's fate decided by small ordered rules (``rules``)
    GuardedConsumer      the envelope guard: malformed messages to the DLQ, never a crash
    Inbox                idempotency by message id and payload fingerprint
    configure            put Aura's settings, queues and DLQ on your own Celery app

Names are imported on first use (PEP 562), so importing one submodule (the topology,
say) does not load them all: the ``aura`` command stays quick to start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aura.messaging._idempotency import (
        Inbox,
        InboxEntry,
        delivery_fingerprint,
        message_fingerprint,
    )
    from aura.messaging._poison import DEFAULT_POISON_TYPES, PoisonPillDetector
    from aura.messaging._retry import RetryTracker
    from aura.messaging._task import backoff_delay, report_duplicate, resilient_task
    from aura.messaging.app import configure, configured_app, default_app
    from aura.messaging.delivery import Delivery, TaskPolicy
    from aura.messaging.dlq import DeadLetter, DeadLetterQueue, route_to_dlq
    from aura.messaging.envelope import GuardedConsumer, check_envelope
    from aura.messaging.fate import (
        Ack,
        BaseRule,
        DeadLetterAs,
        DeferAfter,
        Fail,
        Fate,
        HoldForDatabase,
        RetryAfter,
        Rule,
    )
    from aura.messaging.rules import DEFAULT_RULES

_WHERE = {
    "configure": "app",
    "configured_app": "app",
    "default_app": "app",
    "DeadLetter": "dlq",
    "DeadLetterQueue": "dlq",
    "route_to_dlq": "dlq",
    "GuardedConsumer": "envelope",
    "check_envelope": "envelope",
    "Inbox": "_idempotency",
    "InboxEntry": "_idempotency",
    "delivery_fingerprint": "_idempotency",
    "message_fingerprint": "_idempotency",
    "DEFAULT_POISON_TYPES": "_poison",
    "PoisonPillDetector": "_poison",
    "RetryTracker": "_retry",
    "Delivery": "delivery",
    "TaskPolicy": "delivery",
    "Ack": "fate",
    "BaseRule": "fate",
    "DeadLetterAs": "fate",
    "DeferAfter": "fate",
    "Fail": "fate",
    "Fate": "fate",
    "HoldForDatabase": "fate",
    "RetryAfter": "fate",
    "Rule": "fate",
    "DEFAULT_RULES": "rules",
    "backoff_delay": "_task",
    "report_duplicate": "_task",
    "resilient_task": "_task",
}

__all__ = [
    "DEFAULT_POISON_TYPES",
    "DEFAULT_RULES",
    "Ack",
    "BaseRule",
    "DeadLetter",
    "DeadLetterAs",
    "DeadLetterQueue",
    "DeferAfter",
    "Delivery",
    "Fail",
    "Fate",
    "GuardedConsumer",
    "HoldForDatabase",
    "Inbox",
    "InboxEntry",
    "PoisonPillDetector",
    "RetryAfter",
    "RetryTracker",
    "Rule",
    "TaskPolicy",
    "backoff_delay",
    "check_envelope",
    "configure",
    "configured_app",
    "default_app",
    "delivery_fingerprint",
    "message_fingerprint",
    "report_duplicate",
    "resilient_task",
    "route_to_dlq",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'aura.messaging' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"aura.messaging.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
