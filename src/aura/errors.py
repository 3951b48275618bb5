"""Every error Aura raises, under one root.

    AuraError                         root; ``transient`` says whether a retry may help
    ├── ConfigurationError            a setting is missing or invalid (the CLI exits 2)
    ├── InvalidInputError             bad input: names the field and what is expected
    │   ├── NotFoundError             it names something that does not exist (a tenant)
    │   ├── ConflictError             it clashes with what exists (a SKU already taken)
    │   └── ConflictingMessageIdError a message id already used with another payload
    ├── DatabaseTransactionError      network failure inside @transactional (transient);
    │                                 ``commit_outcome_unknown`` when COMMIT itself failed
    ├── TransactionAbortedError       an inner @transactional call failed and the outer
    │                                 call carried on: the whole transaction rolled back
    ├── ServiceUnavailableError       a service (database, Redis, broker) cannot be reached
    ├── LLMError                      an LLM call failed
    │   ├── LLMTimeoutError           a phase timeout or the overall deadline (transient)
    │   ├── LLMConnectionError        could not connect, or the connection dropped (transient)
    │   ├── LLMHTTPStatusError        non-2xx answer; ``status_code``, ``retry_after``
    │   └── LLMMalformedResponseError the answer is not a chat completion (transient)
    ├── CircuitOpenError              the breaker rejects calls; ``retry_after`` (transient)
    │   └── LLMBudgetExceededError    a tenant's LLM token budget is spent (deferred)
    └── DeadLettered                  a delivery's fate was the DLQ (its letter is safe):
                                      Celery's FAILURE for it, the message acked

``transient`` is what the retry policy reads: a transient error is retried with backoff; a
non-transient one is not. The poison-pill detector never treats a transient Aura error as
poison, whatever built-in type it also derives from.

Every error keeps its cause: raise them ``from`` the original exception.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuraError",
    "CircuitOpenError",
    "ConfigurationError",
    "ConflictError",
    "ConflictingMessageIdError",
    "DatabaseTransactionError",
    "DeadLettered",
    "InvalidInputError",
    "LLMBudgetExceededError",
    "LLMConnectionError",
    "LLMError",
    "LLMHTTPStatusError",
    "LLMMalformedResponseError",
    "LLMTimeoutError",
    "NotFoundError",
    "ServiceUnavailableError",
    "TransactionAbortedError",
    "cause_chain",
]

_MAX_CHAIN = 10


def cause_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it was raised from (``__cause__``, else ``__context__``), bounded:
    a chain can loop."""
    links: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in links and len(links) < _MAX_CHAIN:
        links.append(current)
        current = current.__cause__ or current.__context__
    return links


# Status codes that say the server is sick or overloaded, not that the request is wrong.
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504, 529})  # 529: overloaded


class AuraError(Exception):
    """Root of every error Aura raises."""

    transient: bool = False


class ConfigurationError(AuraError):
    """A setting is missing or invalid. ``str()`` is one line naming the variable."""


class InvalidInputError(AuraError):
    """Input was rejected; nothing was written.

    ``field`` is the dotted path of the first offending field (``variants.0.price``), or
    ``""`` when the input as a whole is wrong; ``errors`` lists (field, problem) for all.
    """

    def __init__(
        self, message: str, *, field: str = "", errors: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.field = field
        self.errors = errors or ((field, message),)


class NotFoundError(InvalidInputError):
    """The input refers to something that does not exist."""


class ConflictError(InvalidInputError):
    """The input clashes with what is already stored."""


class ConflictingMessageIdError(ConflictError):
    """A message id whose effect is stored for another payload: an idempotency key reused
    with another request body. Dead-lettered as ``conflicting_message_id``, never acked
    as a success."""


class DatabaseTransactionError(AuraError):
    """The database connection failed inside a transaction; it was rolled back.

    ``commit_outcome_unknown`` is true when the failure hit COMMIT itself: the server may
    have committed before the connection dropped. Never dead-letter or report failure on
    it; a retry guarded by the inbox (``aura.db.claim_message``) settles it.
    """

    transient = True

    def __init__(self, message: str, *, commit_outcome_unknown: bool = False) -> None:
        super().__init__(message)
        self.commit_outcome_unknown = commit_outcome_unknown


class ServiceUnavailableError(AuraError):
    """A service could not be reached; the message names it (URL passwords masked)."""

    transient = True


class TransactionAbortedError(AuraError):
    """An inner ``@transactional`` call raised and the outer one went on; nothing committed."""


class LLMError(AuraError):
    """An LLM call failed."""


class LLMTimeoutError(LLMError):
    """The call did not finish in time (a phase timeout or the overall deadline)."""

    transient = True


class LLMConnectionError(LLMError):
    """The provider could not be reached, or dropped the connection."""

    transient = True


class LLMHTTPStatusError(LLMError):
    """The provider answered with a non-2xx status.

    ``retry_after`` is the provider's ``Retry-After`` in seconds, when it sent one.
    """

    def __init__(self, status_code: int, message: str, *, retry_after: float | None = None):
        super().__init__(f"LLM provider answered HTTP {status_code}: {message}")
        self.status_code = status_code
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:  # type: ignore[override]
        return self.status_code in _TRANSIENT_STATUS


class LLMMalformedResponseError(LLMError):
    """The provider's answer could not be read as a chat completion."""

    transient = True  # a truncated or garbled answer is the provider's fault; retry


class CircuitOpenError(AuraError):
    """The circuit breaker is open; ``retry_after`` is seconds until a trial call may run."""

    transient = True

    def __init__(self, name: str, retry_after: float) -> None:
        # No super().__init__ and the message made only when asked for: an open breaker
        # raises this on every call it rejects (DESIGN.md: < 5 us per rejection)
        self.name = name
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"circuit breaker {self.name!r} is open; trial call in {self.retry_after:.1f}s"

    def __reduce__(self) -> tuple[type[CircuitOpenError], tuple[str, float]]:
        return type(self), (self.name, self.retry_after)


class LLMBudgetExceededError(CircuitOpenError):
    """A tenant's LLM token budget (``aura.llm.budgets``) per ``window`` ("minute" or
    "day", ``window_s`` seconds long) has no room for the call; ``retry_after`` is seconds
    until enough of it frees. No call was made. A task is deferred on it (no retry spent)
    and, past LLM_BUDGET_MAX_DEFERRALS, dead-lettered as ``budget_exceeded``."""

    def __init__(
        self, tenant: str, retry_after: float, window: str = "minute", window_s: float = 60.0
    ) -> None:
        super().__init__(tenant, retry_after)
        self.window = window
        self.window_s = window_s

    @property
    def tenant(self) -> str:
        return self.name

    def __str__(self) -> str:
        return (
            f"tenant {self.name!r} has spent its LLM token budget per {self.window}; "
            f"room again in {self.retry_after:.1f}s"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.name, self.retry_after, self.window, self.window_s)


class DeadLettered(AuraError):
    """Raised by a resilient task once its delivery's dead letter is confirmed in the DLQ,
    so Celery records what happened: state FAILURE, ``task_failure``, a ``task-failed``
    event, the worker's log line "raised expected" -- never "succeeded". The message is
    acked, not rejected (``aura.messaging.request``): rejected, the broker would
    dead-letter it a second time, without the reason."""

    transient = False

    def __init__(self, message: str, reason: str = "", letter_id: str = "") -> None:
        super().__init__(message, reason, letter_id)
        self.reason = reason
        self.letter_id = letter_id

    def __str__(self) -> str:
        return str(self.args[0])
