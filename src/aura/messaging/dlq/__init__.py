"""The dead-letter queue: where a message goes when it will not succeed, and why.

The DLQ is one durable quorum queue (``aura.dlq``). It holds two kinds of entries, shown
alike by the reader:

* dead letters written by ``route_to_dlq`` (JSON ``DeadLetter`` records): the original
  arguments, task, queue, reason, error, retries, first and last failure, tenant;
* messages the broker dead-lettered itself: after the work queue's delivery limit (their
  worker died on every delivery), shown with reason ``worker_lost``; or rejected by
  Celery after a failure it did not retry, shown as ``task_failed``.

Reasons (a fixed set, also the ``messages_sent_to_dlq_total`` label):

    poison_pill              malformed input; no retry could fix it (zero retries spent)
    max_retries_exceeded     a transient error outlived the retry budget
    max_deferrals_exceeded   the LLM circuit stayed open longer than the deferral bound
    budget_exceeded          its tenant's LLM token budget stayed spent past its bound
    worker_lost              the worker died on every delivery (SIGKILL, OOM, hard limit)
    task_failed              a task without DLQ routing failed; Celery rejected it and the
                             broker dead-lettered it (nothing is acked away on failure)
    malformed_message        not a Celery protocol 2 message for a known task (not JSON,
                             wrong content type or shape, bad headers, unknown task,
                             arguments that do not bind); kept byte for byte, see below
    conflicting_message_id   its id was already used by a message with another payload
                             (like an idempotency key reused with another request body)

A malformed message is stored as it arrived -- the original body bytes, content type,
encoding and headers -- with ``x-aura-*`` headers that say why (``x-aura-format:
original``), so nothing about it is lost; a compressed one that would inflate past the
message size limit keeps its compressed bytes (``aura.messaging._compression``). Views show
its text redacted and bounded; its bytes are kept for the record, never printed, and it
cannot be replayed (its producer must be fixed).

Where letters live: the broker queue is where they land (``route_to_dlq`` waits for the
broker's publisher confirm before it returns, so a caller acks the original only once the
dead letter is safe: a crash in between duplicates it, never loses it). Every read first
files what has landed into the DLQ store (``aura.messaging._dlq_store``: rows committed,
then the broker messages acked), then queries the store; the broker queue is never
browsed, so reading changes no letter, header, delivery count or order. One letter per
(message id, reason, fingerprint): the store's key decides, not Redis.

Replay sends a letter back to the queue it was dead-lettered from (any app's queue;
``to_queue`` overrides) with header ``aura_replay_count``; the task carries that count
into the next dead letter, so a replayed message that fails again is dead-lettered again
with its count, never acked away. Error texts and arguments are redacted before they are
written, and every view redacts again before it cuts: secrets never reach the DLQ's views.

    _letter    DeadLetter, OriginalMessage and the bounds of every text in them
    _write     route_to_dlq, dead_letter_original: publish with a confirm
    _decode    any broker DLQ entry as a DeadLetter, never raising
    _filing    landed messages into the store (commit, then ack), rows back to letters
    _tasks     what the app's tasks say: the tenant in the arguments, the replay checks
    _replay    claim, publish, mark replayed: one replay whoever else replays
    _reader    DeadLetterQueue: file first, then every read a query of the store
    _origin    the queue a delivery came from, and whether the broker delayed it
"""

from __future__ import annotations

from aura.messaging.dlq._letter import (
    MAX_SHOWN_BODY,
    REPLAY_HEADER,
    DeadLetter,
    OriginalMessage,
)
from aura.messaging.dlq._origin import delayed_by_broker, queue_of
from aura.messaging.dlq._reader import DeadLetterQueue, purge, replay, source_of, store_url
from aura.messaging.dlq._replay import MAX_REPLAY_BYTES, ReplayReport, publish_replay
from aura.messaging.dlq._tasks import ReplayCheck, task_checks
from aura.messaging.dlq._write import dead_letter_original, publish_dead_letter, route_to_dlq

__all__ = [
    "MAX_REPLAY_BYTES",
    "MAX_SHOWN_BODY",
    "REPLAY_HEADER",
    "DeadLetter",
    "DeadLetterQueue",
    "OriginalMessage",
    "ReplayCheck",
    "ReplayReport",
    "dead_letter_original",
    "delayed_by_broker",
    "publish_dead_letter",
    "publish_replay",
    "purge",
    "queue_of",
    "replay",
    "route_to_dlq",
    "source_of",
    "store_url",
    "task_checks",
]
