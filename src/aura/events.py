"""Instrumentation events: small frozen records handed to a list of hooks.

Code that observes something (a rollback, a dead letter, a breaker opening) calls
``emit(event)``; hooks turn events into metrics, logs or test records. Prometheus is one
hook (``aura.metrics.prometheus_hook``), installed by default: ``aura.metrics`` is
imported by the first ``emit`` (or by whoever imports it first), so importing ``aura``
stays cheap. A failing hook is logged and never breaks the call it observes.

Label-like fields take values from the fixed sets below (``StrEnum``), so nothing
unbounded -- message ids, tenant ids, exception text -- can become a metric label.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from aura.errors import ConfigurationError

__all__ = [
    "BrokerAckFailed",
    "BudgetWindow",
    "CircuitBreakerOpened",
    "CircuitState",
    "CircuitStateChanged",
    "CustomReason",
    "DeadLetterDepthObserved",
    "DeadLetterReason",
    "DeadLettersDropped",
    "Dependency",
    "DependencyGateChanged",
    "DuplicateDelivered",
    "DuplicateKind",
    "Event",
    "Hook",
    "LLMBudgetCharged",
    "LLMBudgetRefused",
    "LLMOutcome",
    "LLMRateLimitChanged",
    "LLMRateLimited",
    "LLMRequestFinished",
    "MessageDeadLettered",
    "PoolConnectionsChanged",
    "Queue",
    "QueueDepthObserved",
    "RateLimitOutcome",
    "Reason",
    "RetryKind",
    "RollbackReason",
    "TaskFinished",
    "TaskOutcome",
    "TaskRedelivered",
    "TaskRetried",
    "TaskTimedOut",
    "TimeoutKind",
    "TransactionRolledBack",
    "add_hook",
    "dead_letter_reason",
    "emit",
    "hooks",
    "remove_hook",
    "temporary_hook",
]


class RollbackReason(StrEnum):
    NETWORK_ERROR = "network_error"  # the seed's reason: the connection failed
    INVALID_INPUT = "invalid_input"  # the input was refused (InvalidInputError)
    APPLICATION_ERROR = "application_error"  # any other exception, cancellation included


class DeadLetterReason(StrEnum):
    POISON_PILL = "poison_pill"
    MAX_RETRIES_EXCEEDED = "max_retries_exceeded"
    MAX_DEFERRALS_EXCEEDED = "max_deferrals_exceeded"  # the LLM circuit stayed open too long
    WORKER_LOST = "worker_lost"  # dead-lettered by the broker's delivery limit
    TASK_FAILED = "task_failed"  # rejected by Celery (a task without DLQ routing failed)
    MALFORMED_MESSAGE = "malformed_message"  # not a Celery message for a known task
    CONFLICTING_MESSAGE_ID = "conflicting_message_id"  # an id reused with another payload
    BUDGET_EXCEEDED = "budget_exceeded"  # its tenant's LLM token budget stayed spent too long


class CustomReason(str):
    """A dead-letter reason a rule of the user's own names (``aura.messaging.rules``):
    snake_case, at most 40 characters. As bounded a label value as the code naming it."""

    __slots__ = ()

    def __new__(cls, text: str) -> CustomReason:
        if not _REASON_TEXT.fullmatch(text):
            raise ConfigurationError(f"a dead-letter reason is snake_case, 1-40 chars: {text!r}")
        return super().__new__(cls, text)

    @property
    def value(self) -> str:  # read as a DeadLetterReason is
        return str(self)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema  # a letter is a pydantic model

        return core_schema.no_info_after_validator_function(  # Aura's own stay enum members
            dead_letter_reason,
            core_schema.str_schema(),
            serialization=core_schema.to_string_ser_schema(when_used="json"),
        )


_REASON_TEXT = re.compile(r"[a-z][a-z0-9_]{0,39}")
Reason = DeadLetterReason | CustomReason


def dead_letter_reason(text: str) -> Reason:
    """Aura's own reason by that name, else a user's (``ConfigurationError`` if neither)."""
    try:
        return DeadLetterReason(text)
    except ValueError:
        return CustomReason(text)


class DuplicateKind(StrEnum):
    COMMITTED = "committed"  # its effect was committed: acked without running
    DEAD_LETTERED = "dead_lettered"  # its dead letter was written: acked, not written again


class Queue(StrEnum):
    REALTIME = "realtime_queue"
    BULK = "bulk_queue"


class LLMOutcome(StrEnum):
    SUCCESS = "success"
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    HTTP_ERROR = "http_error"
    MALFORMED = "malformed"


class RetryKind(StrEnum):
    RETRY = "retry"  # a transient failure, retried with backoff (spends the retry budget)
    DEFERRAL = "deferral"  # put off: the LLM circuit open, the database out (no budget)


class TaskOutcome(StrEnum):
    SUCCESS = "success"  # the task ran and returned
    RETRY = "retry"  # a transient failure: retried with backoff (spends the budget)
    DEFERRED = "deferred"  # put off (an open breaker, the database out): no budget spent
    DEAD_LETTERED = "dead_lettered"  # in the DLQ (the reason is its own label)
    DUPLICATE = "duplicate"  # its effect was already committed: acked without running
    REQUEUED = "requeued"  # put back on its queue (a retry that could not be published)
    FAILED = "failed"  # an error escaped the fate engine (a bug): rejected


class TimeoutKind(StrEnum):
    SOFT = "soft"  # SoftTimeLimitExceeded raised in the task: it cleaned up, then retried
    HARD = "hard"  # the pool killed the process: redelivered (acks_late), or the DLQ


class RateLimitOutcome(StrEnum):
    ADMITTED = "admitted"  # a slot was reserved (the call may have waited for it)
    DEFERRED = "deferred"  # no slot within the call's wait: deferred, not called
    THROTTLED = "throttled"  # the provider answered 429: the fleet held off
    DECREASED = "decreased"  # the fleet's adaptive share of the limit shrank (AIMD)


class BudgetWindow(StrEnum):
    MINUTE = "minute"  # a tenant's LLM tokens per minute (aura.llm.budgets)
    DAY = "day"  # ... and per day


class Dependency(StrEnum):
    DATABASE = "database"


class CircuitState(StrEnum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


@dataclass(frozen=True, slots=True)
class TransactionRolledBack:
    function: str
    reason: RollbackReason


@dataclass(frozen=True, slots=True)
class PoolConnectionsChanged:
    delta: int  # +1 on checkout, -1 on checkin or invalidation


@dataclass(frozen=True, slots=True)
class CircuitBreakerOpened:
    """Emitted once per fleet-wide transition to open (by the process that made it)."""

    breaker: str


@dataclass(frozen=True, slots=True)
class CircuitStateChanged:
    breaker: str
    state: CircuitState


@dataclass(frozen=True, slots=True)
class LLMRequestFinished:
    outcome: LLMOutcome
    duration_s: float
    # The model asked for: from configuration (a client keeps at most 64), never from input
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class LLMRateLimited:
    """One decision or signal of a fleet-wide rate limiter (``limiter``: provider/model,
    from configuration); ``wait_s``: how long an admitted call waits for its slot."""

    limiter: str
    outcome: RateLimitOutcome
    wait_s: float = 0.0


@dataclass(frozen=True, slots=True)
class LLMRateLimitChanged:
    """The limits a rate limiter applies now (configured x its adaptive share)."""

    limiter: str
    rpm: float
    tpm: float


@dataclass(frozen=True, slots=True)
class LLMBudgetCharged:
    tokens: int  # a settled call's charge to its tenant's budget (no tenant: not a label)


@dataclass(frozen=True, slots=True)
class LLMBudgetRefused:
    window: BudgetWindow  # a call not made: its tenant's budget per window was spent


@dataclass(frozen=True, slots=True)
class MessageDeadLettered:
    reason: Reason
    task: str


@dataclass(frozen=True, slots=True)
class DeadLettersDropped:
    """Dead letters the DLQ store's retention bound removed."""

    reason: str
    count: int


@dataclass(frozen=True, slots=True)
class DuplicateDelivered:
    """A delivery whose fate was already settled (a redelivery, a relay's second copy)."""

    kind: DuplicateKind


@dataclass(frozen=True, slots=True)
class TaskRetried:
    task: str
    kind: RetryKind


@dataclass(frozen=True, slots=True)
class TaskFinished:
    """One delivery of a resilient task ended (``reason``: the dead letter's, else "";
    ``tenant``: its call's ``tenant_id``, a label only as ``aura.tenant_labels`` allows)."""

    task: str
    outcome: TaskOutcome
    duration_s: float
    reason: str = ""
    tenant: str | None = None


@dataclass(frozen=True, slots=True)
class TaskRedelivered:
    """A delivery whose last run never finished (its worker was killed, or lost the
    broker connection before its ack)."""

    task: str


@dataclass(frozen=True, slots=True)
class TaskTimedOut:
    task: str
    kind: TimeoutKind


@dataclass(frozen=True, slots=True)
class QueueDepthObserved:
    queue: Queue | str  # a user's own queue name after aura.messaging.configure
    pending: int


@dataclass(frozen=True, slots=True)
class DeadLetterDepthObserved:
    """Messages in the DLQ, read from the broker (the truth, whoever wrote them)."""

    messages: int


@dataclass(frozen=True, slots=True)
class DependencyGateChanged:
    """A worker process's outage gate (``aura.messaging._gate``) closed or opened."""

    dependency: Dependency
    available: bool


@dataclass(frozen=True, slots=True)
class BrokerAckFailed:
    """An ack or reject could not be sent (the broker connection was lost): the message
    comes back to another delivery, which the inbox or the counters settle."""


Event = (
    TransactionRolledBack
    | PoolConnectionsChanged
    | CircuitBreakerOpened
    | CircuitStateChanged
    | LLMRequestFinished
    | LLMRateLimited
    | LLMRateLimitChanged
    | LLMBudgetCharged
    | LLMBudgetRefused
    | TaskTimedOut
    | MessageDeadLettered
    | DeadLettersDropped
    | TaskRetried
    | TaskFinished
    | TaskRedelivered
    | DuplicateDelivered
    | QueueDepthObserved
    | DeadLetterDepthObserved
    | DependencyGateChanged
    | BrokerAckFailed
)
Hook = Callable[[Event], None]

_hooks: tuple[Hook, ...] = ()
_hooks_lock = threading.Lock()  # guards registration only; emit reads a snapshot


def add_hook(hook: Hook) -> None:
    global _hooks
    with _hooks_lock:
        if hook not in _hooks:
            _hooks = (*_hooks, hook)


def remove_hook(hook: Hook) -> None:
    global _hooks
    with _hooks_lock:
        _hooks = tuple(h for h in _hooks if h is not hook)


def hooks() -> tuple[Hook, ...]:
    return _hooks


@contextmanager
def temporary_hook(hook: Hook) -> Iterator[Hook]:
    """Install ``hook`` for the duration of a ``with`` block (tests, one-off reports)."""
    add_hook(hook)
    try:
        yield hook
    finally:
        remove_hook(hook)


def emit(event: Event) -> None:
    """Hand ``event`` to every hook; a hook that raises is logged and skipped."""
    if not _defaults_loaded:
        _load_default_hooks()
    for hook in _hooks:
        try:
            hook(event)
        except Exception:  # a broken hook must never break the observed call
            import structlog

            structlog.get_logger("aura.events").exception(
                "instrumentation hook failed", hook=repr(hook), observed=repr(event)
            )


_defaults_loaded = False


def _load_default_hooks() -> None:
    global _defaults_loaded
    import aura.metrics  # noqa: F401  (adds prometheus_hook)

    _defaults_loaded = True
