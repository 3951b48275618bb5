"""Message processing (seed patterns 3-5): poison pills, retry tracking, the DLQ and
``@resilient_task``.

    PoisonPillDetector   is_poison_pill / get_poison_reason
    RetryTracker         increment_and_check, one Redis round trip, ``retry_count:{id}``
    route_to_dlq         publish a dead letter with a confirm, then count it
    DeadLetterQueue      list / show / replay / purge (``aura dlq``)
    resilient_task       the Celery task decorator, for ``def`` and ``async def``
    GuardedConsumer      the envelope guard: malformed messages to the DLQ, never a crash
    Inbox                idempotency by message id and payload fingerprint
"""

from aura.messaging.dlq import DeadLetter, DeadLetterQueue, route_to_dlq
from aura.messaging.envelope import GuardedConsumer, check_envelope
from aura.messaging.idempotency import Inbox, InboxEntry, delivery_fingerprint, message_fingerprint
from aura.messaging.poison import DEFAULT_POISON_TYPES, PoisonPillDetector
from aura.messaging.retry import RetryTracker
from aura.messaging.task import backoff_delay, resilient_task

__all__ = [
    "DEFAULT_POISON_TYPES",
    "DeadLetter",
    "DeadLetterQueue",
    "GuardedConsumer",
    "Inbox",
    "InboxEntry",
    "PoisonPillDetector",
    "RetryTracker",
    "backoff_delay",
    "check_envelope",
    "delivery_fingerprint",
    "message_fingerprint",
    "resilient_task",
    "route_to_dlq",
]
