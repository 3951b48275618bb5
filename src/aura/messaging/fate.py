"""A delivery's fate as data: the outcomes a rule can choose, and the rule protocol.

A ``Rule`` (``aura.messaging.rules`` holds Aura's own) looks at one ``Delivery`` at two
points: ``before`` the task runs (it may settle the delivery without running it), and
``on_failure`` after the task raised. Rules are asked in their list's order; the first
that returns a fate decides, and no later rule is asked -- so a later rule can neither
change the reason an earlier one chose nor turn its dead letter into a retry. The order
is data (``aura.messaging.rules.DEFAULT_RULES``), and a task may be given its own list
(``resilient_task(rules=[MyRule(), *DEFAULT_RULES])``) without editing Aura.

    Ack            settled without running (its effect is committed): acked
    RetryAfter     a failure: retried after ``countdown`` s, spending the retry budget
    DeferAfter     put off after ``countdown`` s: no budget spent (breaker open, outage)
    DeadLetterAs   to the DLQ with ``reason`` (the inbox has the last word, see below)
    Fail           Celery's own failure (a task without DLQ routing)
    HoldForDatabase  the database cannot take it now: held at the outage gate, then run
                     again (``aura.messaging._gate``); no budget spent

A rule that raises is logged and skipped (dramatiq's rule for middleware: a failing hook
never breaks the delivery); a failure no rule decides is raised as it came.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import structlog
from celery.exceptions import Ignore, Reject, Retry

from aura.events import Reason
from aura.logs import describe_exception

if TYPE_CHECKING:
    from aura.messaging.delivery import Delivery

__all__ = [
    "Ack",
    "BaseRule",
    "DeadLetterAs",
    "DeferAfter",
    "Fail",
    "Fate",
    "HoldForDatabase",
    "RetryAfter",
    "Rule",
    "first_fate",
]

_log = structlog.get_logger("aura.messaging.fate")


@dataclass(frozen=True, slots=True)
class Ack:
    """Settled without running: its effect is committed. ``recover`` runs the task's
    ``on_duplicate`` hook first (to redo recovery steps such as queueing follow-up work)."""

    recover: bool = True


@dataclass(frozen=True, slots=True)
class RetryAfter:
    countdown: float
    failures: int  # this one included: carried in the retried message's header
    error: BaseException


@dataclass(frozen=True, slots=True)
class DeferAfter:
    countdown: float
    error: BaseException
    counted: bool = True  # emitted as a deferral (``aura_task_retries_total``)


@dataclass(frozen=True, slots=True)
class DeadLetterAs:
    """To the DLQ. Unless ``check_inbox`` is False, the inbox is read first and has the
    last word: a committed effect is acked instead, an id committed for another payload
    goes as ``conflicting_message_id``, an unreadable inbox puts the delivery off."""

    reason: Reason
    error: BaseException
    retries: int  # what the letter reports as spent
    error_text: str | None = None  # the letter's text, when not the error's own
    check_inbox: bool = True


@dataclass(frozen=True, slots=True)
class Fail:
    error: BaseException


@dataclass(frozen=True, slots=True)
class HoldForDatabase:
    error: BaseException


Fate = Ack | RetryAfter | DeferAfter | DeadLetterAs | Fail | HoldForDatabase


@runtime_checkable
class Rule(Protocol):
    """One step of the fate engine. Either hook may return ``None``: not this rule's call."""

    def before(self, delivery: Delivery) -> Fate | None: ...

    def on_failure(self, delivery: Delivery, error: Exception) -> Fate | None: ...


class BaseRule:
    """A rule that decides nothing: subclass it and override the hook you need."""

    def before(self, delivery: Delivery) -> Fate | None:
        return None

    def on_failure(self, delivery: Delivery, error: Exception) -> Fate | None:
        return None


def first_fate(
    rules: Sequence[Rule], ask: Callable[[Rule], Fate | None], delivery: Delivery
) -> Fate | None:
    """The first fate ``ask(rule)`` returns, in the rules' order. A rule that raises is
    logged and skipped; Celery's own control flow (``Retry``, ``Ignore``, ``Reject``)
    passes through."""
    for rule in rules:
        try:
            fate = ask(rule)
        except (Retry, Ignore, Reject):
            raise
        except Exception as exc:
            _log.error(
                "a fate rule failed; skipped",
                rule=type(rule).__name__,
                task=delivery.name,
                message_id=delivery.message_id,
                error=describe_exception(exc, 300),
            )
            continue
        if fate is not None:
            return fate
    return None
