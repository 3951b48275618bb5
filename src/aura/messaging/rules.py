"""Aura's fate rules, in the order they are asked (``DEFAULT_RULES``).

=====  ================  ===========  ==================================================
order  rule              asked        decides
=====  ================  ===========  ==================================================
--     envelope guard    at the       not a Celery message for a known task, arguments
                         consumer     that do not bind -> DLQ (malformed_message);
                                      before any task exists (``aura.messaging.envelope``)
1      InboxLookup       before       committed twin -> Ack (``on_duplicate`` first);
                                      id committed for another payload -> DLQ
                                      (conflicting_message_id); database out -> hold
2      Redelivery        before       redelivered past the budget -> DLQ (worker_lost);
                                      a redelivery counts as a failure
3      BudgetExceeded    on failure   LLMBudgetExceededError (its tenant's token budget
                                      is spent) -> defer until it has room (no budget);
                                      past LLM_BUDGET_MAX_DEFERRALS -> DLQ
                                      (budget_exceeded)
4      BreakerOpen       on failure   CircuitOpenError -> defer until a trial may go (no
                                      budget); past ``max_deferrals`` -> DLQ
                                      (max_deferrals_exceeded)
5      DatabaseOutage    on failure   the database cannot take it (inbox tasks) -> hold
                                      at the outage gate (no budget)
6      SoftTimeLimit     on failure   observes only: counts the soft timeout
7      ConflictingId     on failure   its claim found the id taken by another payload
                                      -> DLQ (conflicting_message_id)
8      PoisonPill        on failure   the detector says poison -> DLQ (poison_pill), no
                                      retry spent
9      RetryBudget       on failure   anything else -> retry with backoff, or past
                                      ``max_retries`` -> DLQ (max_retries_exceeded)
=====  ================  ===========  ==================================================

Every rule is small and keeps to its own question; a custom one (a poison classifier of
your own, say) goes into a task's list where it should be asked::

    @resilient_task(rules=[RefuseBadSkus(), *DEFAULT_RULES])
"""

from __future__ import annotations

import structlog
from billiard.exceptions import SoftTimeLimitExceeded, WorkerLostError

from aura import events
from aura.backoff import Backoff
from aura.config import get_settings
from aura.db import is_outage
from aura.errors import (
    CircuitOpenError,
    ConflictingMessageIdError,
    DatabaseTransactionError,
    LLMBudgetExceededError,
    LLMError,
    LLMHTTPStatusError,
    cause_chain,
)
from aura.events import DeadLetterReason, TaskRedelivered, TaskTimedOut, TimeoutKind
from aura.logs import describe_exception
from aura.messaging._retry import KEY_PREFIX
from aura.messaging.delivery import Delivery, failures_so_far
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

__all__ = [
    "BUDGET_DEFER_PREFIX",
    "DEFAULT_RULES",
    "DEFER_PREFIX",
    "MIN_COUNTDOWN",
    "BreakerOpen",
    "BudgetExceeded",
    "ConflictingId",
    "DatabaseOutage",
    "InboxLookup",
    "PoisonPill",
    "Redelivery",
    "RetryBudget",
    "SoftTimeLimit",
    "database_out",
    "deferrals_spent",
    "outage_countdown",
    "put_off_for_database",
]

_log = structlog.get_logger("aura.messaging.rules")
DEFER_PREFIX = "defer_count:"
BUDGET_DEFER_PREFIX = "budget_defer_count:"
# A budget deferral is at most this long, so its counter (RETRY_TRACKER_TTL, 1 h, renewed
# on each count) outlives the wait: a tenant out of its day's budget comes back each 30 min
_MAX_BUDGET_COUNTDOWN = 1800.0
# RabbitMQ's native delayed delivery (how Celery delays retries on quorum queues) counts
# whole seconds, and refuses a countdown below one.
MIN_COUNTDOWN = 1.0
# A deferral while the database is out resumes within 10 s of it answering (a flat
# second made 34 deliveries of one message in 56 s against a wrong address).
_OUTAGE_BACKOFF = Backoff(base=1.0, cap=10.0, floor=MIN_COUNTDOWN)
_DATABASE_MODULES = ("sqlalchemy", "asyncpg", "aura.db")


class InboxLookup(BaseRule):
    """Before it runs, the inbox says whether its effect is committed. An inbox read that
    fails for another reason than an outage lets it run: its claim decides."""

    def before(self, delivery: Delivery) -> Fate | None:
        inbox = delivery.policy.inbox
        if inbox is None or not delivery.policy.lookup_first:
            return None
        try:
            entry = delivery.run(inbox.lookup(delivery.message_id))
        except Exception as exc:
            if is_outage(exc):  # an outage, not this message: no LLM call, no budget
                return HoldForDatabase(exc)
            _log.warning(
                "inbox lookup failed; the delivery runs and its claim decides",
                task=delivery.name,
                message_id=delivery.message_id,
                error=describe_exception(exc, 300),
            )
            return None
        if not delivery.runtime.database_gate.is_open:
            delivery.runtime.database_gate.succeeded()  # it answered
        if entry is None:
            return None
        if entry.matches(delivery.fingerprint):
            return Ack()
        conflict = ConflictingMessageIdError(
            f"message id {delivery.message_id} was committed for another payload "
            f"(stored {entry.fingerprint}, this one {delivery.fingerprint})"
        )
        return DeadLetterAs(DeadLetterReason.CONFLICTING_MESSAGE_ID, conflict, 0, check_inbox=False)


class Redelivery(BaseRule):
    """A redelivered message's last run never finished (the worker died, or lost the
    connection before the ack). It counts as a failure in the retry budget, so crashes
    and retries together stay within ``max_retries + 1`` runs."""

    def before(self, delivery: Delivery) -> Fate | None:
        if not delivery.redelivered:
            return None
        events.emit(TaskRedelivered(delivery.name))
        _log.warning(
            "redelivered: its last delivery never finished (its worker was killed, or lost "
            "the broker connection before the ack)",
            task=delivery.name,
            message_id=delivery.message_id,
        )
        policy = delivery.policy
        tracker = delivery.runtime.tracker(KEY_PREFIX, policy.max_retries)
        try:
            spent = delivery.run(
                tracker.increment_and_check(
                    delivery.message_id, fallback_count=failures_so_far(delivery.request)
                )
            )
        except Exception as exc:  # Redis refusing (a full pool, say): run it; the broker's
            _log.warning(  # delivery limit still bounds a message that kills every run
                "could not count a redelivery; running it",
                task=delivery.name,
                message_id=delivery.message_id,
                error=describe_exception(exc, 300),
            )
            return None
        if not spent:
            return None
        lost = WorkerLostError("its worker died on every run (killed, out of memory or hard limit)")
        return DeadLetterAs(DeadLetterReason.WORKER_LOST, lost, policy.max_retries)


class BreakerOpen(BaseRule):
    """The LLM circuit is open: put off until a trial may go, spreading the fleet's
    trials over a second; no retry spent."""

    def on_failure(self, delivery: Delivery, error: Exception) -> Fate | None:
        if not isinstance(error, CircuitOpenError):
            return None
        if deferrals_spent(delivery):
            return DeadLetterAs(DeadLetterReason.MAX_DEFERRALS_EXCEEDED, error, delivery.retries)
        jitter = delivery.runtime.rng.uniform(0, 1.0)
        return DeferAfter(max(error.retry_after + jitter, MIN_COUNTDOWN), error)


class BudgetExceeded(BaseRule):
    """The call's tenant has spent its LLM token budget (no call was made): put off until
    its window has room, spread over up to one more window so the tenant's backlog does
    not all come back at once; no retry spent. Past ``max_deferrals`` (default:
    LLM_BUDGET_MAX_DEFERRALS) -> DLQ (budget_exceeded). Before ``BreakerOpen``, which
    would otherwise take it as any ``CircuitOpenError``."""

    def __init__(self, max_deferrals: int | None = None) -> None:
        self.max_deferrals = max_deferrals

    def on_failure(self, delivery: Delivery, error: Exception) -> Fate | None:
        if not isinstance(error, LLMBudgetExceededError):
            return None
        limit = self.max_deferrals
        if limit is None:
            limit = get_settings().llm_budget_max_deferrals
        if deferrals_spent(delivery, prefix=BUDGET_DEFER_PREFIX, limit=limit):
            return DeadLetterAs(DeadLetterReason.BUDGET_EXCEEDED, error, delivery.retries)
        spread = delivery.runtime.rng.uniform(0, min(error.window_s, _MAX_BUDGET_COUNTDOWN))
        countdown = min(error.retry_after + spread, _MAX_BUDGET_COUNTDOWN)
        return DeferAfter(max(countdown, MIN_COUNTDOWN), error)


class DatabaseOutage(BaseRule):
    """The database cannot take this delivery now (refused, too many clients, a pool
    timeout): held at the outage gate. Only an error that came from the database: a
    task's own ConnectionError, or an LLM timeout raised from asyncio's, is an outage of
    something else (a retry). Not a transaction cut in flight either (its outcome is for
    the inbox and a retry to settle: ``DatabaseTransactionError``)."""

    def on_failure(self, delivery: Delivery, error: Exception) -> Fate | None:
        if delivery.policy.inbox is None or not database_out(error):
            return None
        return HoldForDatabase(error)


class SoftTimeLimit(BaseRule):
    """Counts a soft timeout; the retry budget decides its fate."""

    def on_failure(self, delivery: Delivery, error: Exception) -> Fate | None:
        if isinstance(error, SoftTimeLimitExceeded):
            events.emit(TaskTimedOut(delivery.name, TimeoutKind.SOFT))
        return None


class ConflictingId(BaseRule):
    """The task's own claim found its id committed for another payload (a twin ran at
    once): that, not how it failed, is its fate."""

    def on_failure(self, delivery: Delivery, error: Exception) -> Fate | None:
        if not any(isinstance(link, ConflictingMessageIdError) for link in cause_chain(error)):
            return None
        reason = DeadLetterReason.CONFLICTING_MESSAGE_ID
        return DeadLetterAs(reason, error, 0, check_inbox=False)


class PoisonPill(BaseRule):
    """An error no retry can fix (``PoisonPillDetector``): the DLQ at once."""

    def on_failure(self, delivery: Delivery, error: Exception) -> Fate | None:
        policy = delivery.policy
        if not policy.poison_pill_detection or not policy.detector.is_poison_pill(error):
            return None
        if not policy.dlq_routing:
            return Fail(error)
        text = policy.detector.get_poison_reason(error)
        return DeadLetterAs(DeadLetterReason.POISON_PILL, error, 0, text)


class RetryBudget(BaseRule):
    """Any other failure spends one retry: backoff (a Retry-After as its floor), or past
    ``max_retries``, the DLQ. Counted from the failures so far, not ``request.retries``:
    that also counts deferrals, and a task put off five times is on its first failure."""

    def on_failure(self, delivery: Delivery, error: Exception) -> Fate | None:
        policy = delivery.policy
        tracker = delivery.runtime.tracker(KEY_PREFIX, policy.max_retries)
        fallback = failures_so_far(delivery.request)
        failures = delivery.run(tracker.increment(delivery.message_id, fallback_count=fallback))
        if failures > policy.max_retries:
            if not policy.dlq_routing:
                return Fail(error)
            reason = DeadLetterReason.MAX_RETRIES_EXCEEDED
            return DeadLetterAs(reason, error, policy.max_retries)
        retry_after = error.retry_after if isinstance(error, LLMHTTPStatusError) else None
        countdown = policy.backoff.delay(failures, delivery.runtime.rng, retry_after=retry_after)
        return RetryAfter(max(countdown, MIN_COUNTDOWN), failures, error)


DEFAULT_RULES: tuple[Rule, ...] = (
    InboxLookup(),
    Redelivery(),
    BudgetExceeded(),
    BreakerOpen(),
    DatabaseOutage(),
    SoftTimeLimit(),
    ConflictingId(),
    PoisonPill(),
    RetryBudget(),
)


def deferrals_spent(
    delivery: Delivery, *, prefix: str = DEFER_PREFIX, limit: int | None = None
) -> bool:
    """Count one more deferral of this delivery (under ``prefix``); whether that spends
    ``limit`` (default: ``max_deferrals``; Redis unable to count: Celery's own count of the
    delivery's retries bounds it)."""
    limit = delivery.policy.max_deferrals if limit is None else limit
    deferrals = delivery.runtime.tracker(prefix, limit)
    try:
        count = deferrals.increment_and_check(delivery.message_id, fallback_count=delivery.retries)
        return bool(delivery.run(count))
    except Exception:
        return delivery.retries >= limit


def outage_countdown(delivery: Delivery) -> float:
    """Backoff by the delivery's own retries, capped so work resumes within 10 s of the
    dependency answering."""
    return _OUTAGE_BACKOFF.delay(delivery.retries + 1, delivery.runtime.rng)


def put_off_for_database(delivery: Delivery, error: BaseException) -> Fate:
    """The database stayed out past the hold: put off through the broker (deferral
    budget, backoff) without running -- no LLM call, no retry spent -- or, the deferrals
    spent, dead-lettered (``max_deferrals_exceeded``)."""
    text = describe_exception(error, 300)
    if deferrals_spent(delivery):
        _log.error("the database stayed unavailable past the deferrals; dead-lettering", error=text)
        reason = DeadLetterReason.MAX_DEFERRALS_EXCEEDED
        return DeadLetterAs(reason, error, delivery.retries, check_inbox=False)
    countdown = outage_countdown(delivery)
    _log.warning(
        "the database is unavailable; put off before running",
        task=delivery.name,
        message_id=delivery.message_id,
        countdown=round(countdown, 3),
        error=text,
    )
    return DeferAfter(countdown, error)


def database_out(exc: BaseException) -> bool:
    """The database cannot take this delivery now (see ``DatabaseOutage``)."""
    chain = cause_chain(exc)
    if any(
        isinstance(link, DatabaseTransactionError | LLMError | CircuitOpenError) for link in chain
    ):
        return False
    return is_outage(exc) and any(_from_the_database(link) for link in chain)


def _from_the_database(error: BaseException) -> bool:
    """Raised by the database's driver or SQLAlchemy, or passed through their code."""
    if type(error).__module__.startswith(_DATABASE_MODULES):
        return True
    frames = error.__traceback__
    while frames is not None:
        if str(frames.tb_frame.f_globals.get("__name__", "")).startswith(_DATABASE_MODULES):
            return True
        frames = frames.tb_next
    return False
