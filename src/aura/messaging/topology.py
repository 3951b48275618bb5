"""The broker's layout: work queues, the dead-letter exchange and the DLQ.

An app's work queues (its own names: ``configure(app, queues=...)``) are quorum queues
with an explicit delivery limit
(RabbitMQ 3.10 sets none by default) and at-least-once dead-lettering into ``aura.dlq``:
the broker's backstop when a message kills its worker on every delivery, since no
process survives to count those deliveries. Every other failure is dead-lettered by
``resilient_task`` itself, with a reason, before the original is acked.

The delivery limit is a constant, not RETRY_TRACKER_MAX_RETRIES: queue arguments cannot
change once a queue exists (RabbitMQ refuses the next declaration with
PRECONDITION_FAILED), so a limit that followed a setting would stop every worker the day
someone changed it. ``resilient_task`` counts crash redeliveries against
RETRY_TRACKER_MAX_RETRIES itself; the broker's limit only ends what that cannot (Redis
down, or a process that dies before it can count).
"""

from __future__ import annotations

from collections.abc import Sequence

from kombu.entity import Exchange, Queue

__all__ = [
    "BROKER_DELIVERY_LIMIT",
    "DEAD_LETTER_EXCHANGE",
    "DEAD_LETTER_QUEUE",
    "WORK_EXCHANGE",
    "broker_nodes",
    "dead_letter_queue",
    "work_queues",
]

DEAD_LETTER_QUEUE = "aura.dlq"
BROKER_DELIVERY_LIMIT = 10
DEAD_LETTER_EXCHANGE = Exchange("aura.dlx", type="direct", durable=True)
# Topic, because Celery's native delayed delivery (retries with a countdown on quorum
# queues) routes through topic exchanges.
WORK_EXCHANGE = Exchange("aura.tasks", type="topic", durable=True)


def dead_letter_queue() -> Queue:
    return Queue(
        DEAD_LETTER_QUEUE,
        DEAD_LETTER_EXCHANGE,
        routing_key=DEAD_LETTER_QUEUE,
        durable=True,
        queue_arguments={"x-queue-type": "quorum"},
    )


def work_queues(names: Sequence[str], delivery_limit: int = BROKER_DELIVERY_LIMIT) -> list[Queue]:
    """The work queues ``names``; a message is dead-lettered after ``delivery_limit`` + 1
    deliveries that were never acknowledged."""
    arguments = {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE.name,
        "x-dead-letter-routing-key": DEAD_LETTER_QUEUE,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    return [
        Queue(name, WORK_EXCHANGE, routing_key=name, durable=True, queue_arguments=arguments)
        for name in names
    ]


def broker_nodes(configured: object) -> list[str]:
    """The nodes of a broker URL as kombu takes it (one URL, a ``;``-separated failover
    list, or a list of URLs), in order, blanks dropped."""
    listed = configured if isinstance(configured, list | tuple) else str(configured).split(";")
    return [str(url).strip() for url in listed if str(url).strip()]
