"""Every Prometheus metric the seed names, with exactly the seed's names and labels.

    database_transaction_rollbacks_total{reason}   reason: network_error | invalid_input |
                                                   application_error
    sqlalchemy_pool_connections_active             connections checked out of the pool
    llm_circuit_breaker_opens_total                once per fleet-wide transition to open
    llm_circuit_breaker_state{breaker}             0 closed, 1 half-open, 2 open
    llm_api_request_duration_seconds{outcome}      histogram; outcome from ``LLMOutcome``
    messages_sent_to_dlq_total{reason}             reason: poison_pill | max_retries_exceeded
                                                   (and Aura's others: ``DeadLetterReason``)
    celery_tasks_pending{queue}                    queue: realtime_queue | bulk_queue (or
                                                   the queues given to messaging.configure)

Not in the seed, named in its style:

    aura_task_retries_total{kind}                  kind: retry | deferral
    aura_duplicate_deliveries_total{kind}          kind: committed | dead_lettered (a
                                                   delivery whose fate was already settled)
    celery_task_timeouts_total{kind}               kind: soft | hard (the seed's "task
                                                   timeouts" alert needs a count)
    aura_llm_circuit_breaker_opens_total{breaker}  the seed's opens, per breaker (one per
                                                   provider and model)
    aura_llm_requests_total{model,outcome}         LLM calls by model (from configuration)
    aura_llm_tokens_total{model,kind}              kind: prompt | completion
    aura_llm_rate_limit_total{limiter,outcome}     the fleet-wide rate limiter's decisions
                                                   and signals: admitted | deferred |
                                                   throttled (429) | decreased (AIMD)
    aura_llm_rate_limit_wait_seconds{limiter}      how long admitted calls waited for a slot
    aura_llm_rate_limit_rpm{limiter}               the requests per minute it applies now
    aura_llm_rate_limit_tpm{limiter}               ... and tokens per minute (configured x
                                                   the adaptive share)
    aura_llm_budget_tokens_total                   tokens charged to tenants' budgets (no
                                                   tenant label: invariant 6)
    aura_llm_budget_deferrals_total{window}        calls refused over a tenant's budget,
                                                   window: minute | day (the task deferred)
    aura_dlq_messages                              messages in the DLQ now, read from the
                                                   broker by every worker's queue poller:
                                                   the truth, where messages_sent_to_dlq_total
                                                   counts what this process routed (0 in the
                                                   gateway, which routes none)
    aura_dlq_letters_dropped_total{reason}         dead letters the store's retention
                                                   bound removed (DLQ_RETENTION_*)
    aura_dependency_available{dependency}          dependency: database; 0 while a worker
                                                   process holds deliveries at its outage
                                                   gate (``aura.messaging._gate``)
    aura_task_outcomes_total{task,outcome,reason}  every delivery of a resilient task: outcome
                                                   success | retry | deferred | dead_lettered
                                                   | duplicate | requeued | failed; reason:
                                                   the dead letter's (else ""); task: the
                                                   app's registered names (from code)
    aura_task_outcomes_by_tenant_total{tenant,outcome}
                                                   the same by tenant: an id METRICS_TENANTS
                                                   names, else other (none: no tenant), so
                                                   the series never grow with the tenants
    aura_task_duration_seconds{task}               a delivery's time, outage holds included
    aura_task_redeliveries_total{task}             deliveries whose last run never finished
                                                   (worker killed, connection lost)
    aura_broker_ack_failures_total                 acks lost with the broker connection
                                                   (Celery's "Couldn't ack", a warning here)

Metrics live in the default registry, so Prometheus multiprocess mode (a worker under
prefork, ``PROMETHEUS_MULTIPROC_DIR`` set) works without changes here. Every labelled
series is created at import with value 0, so alerts and scrapes see it before the first
event. Code never touches these objects directly: it emits ``aura.events`` and
``prometheus_hook`` (installed at import) updates them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from aura import events
from aura.events import (
    BrokerAckFailed,
    BudgetWindow,
    CircuitBreakerOpened,
    CircuitState,
    CircuitStateChanged,
    DeadLetterDepthObserved,
    DeadLetterReason,
    DeadLettersDropped,
    Dependency,
    DependencyGateChanged,
    DuplicateDelivered,
    DuplicateKind,
    Event,
    LLMBudgetCharged,
    LLMBudgetRefused,
    LLMOutcome,
    LLMRateLimitChanged,
    LLMRateLimited,
    LLMRequestFinished,
    MessageDeadLettered,
    PoolConnectionsChanged,
    QueueDepthObserved,
    RateLimitOutcome,
    RetryKind,
    RollbackReason,
    TaskFinished,
    TaskOutcome,
    TaskRedelivered,
    TaskRetried,
    TaskTimedOut,
    TimeoutKind,
    TransactionRolledBack,
)
from aura.tenant_labels import OTHER, tenant_label

__all__ = [
    "AURA_DLQ_LETTERS_DROPPED",
    "AURA_DLQ_MESSAGES",
    "AURA_DUPLICATE_DELIVERIES",
    "CELERY_TASKS_PENDING",
    "CELERY_TASK_TIMEOUTS",
    "CIRCUIT_STATE_VALUES",
    "DATABASE_TRANSACTION_ROLLBACKS",
    "LLM_API_REQUEST_DURATION",
    "LLM_CIRCUIT_BREAKER_OPENS",
    "LLM_CIRCUIT_BREAKER_STATE",
    "MESSAGES_SENT_TO_DLQ",
    "SEED_METRIC_NAMES",
    "SQLALCHEMY_POOL_CONNECTIONS_ACTIVE",
    "expect_queues",
    "exposition_registry",
    "prometheus_hook",
    "tenant_label",
]

# The names as the seed writes them (counters carry the _total suffix on exposition).
SEED_METRIC_NAMES = (
    "database_transaction_rollbacks_total",
    "sqlalchemy_pool_connections_active",
    "llm_circuit_breaker_opens_total",
    "llm_api_request_duration_seconds",
    "messages_sent_to_dlq_total",
    "celery_tasks_pending",
)

CIRCUIT_STATE_VALUES = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}

DATABASE_TRANSACTION_ROLLBACKS = Counter(
    "database_transaction_rollbacks_total",
    "Transactions rolled back by @transactional, by reason.",
    ["reason"],
)
SQLALCHEMY_POOL_CONNECTIONS_ACTIVE = Gauge(
    "sqlalchemy_pool_connections_active",
    "Database connections currently checked out of the pool.",
    multiprocess_mode="livesum",
)
LLM_CIRCUIT_BREAKER_OPENS = Counter(
    "llm_circuit_breaker_opens_total",
    "Transitions of the LLM circuit breaker to open (once per fleet-wide transition).",
)
LLM_CIRCUIT_BREAKER_STATE = Gauge(
    "llm_circuit_breaker_state",
    "State of the LLM circuit breaker: 0 closed, 1 half-open, 2 open.",
    ["breaker"],
    multiprocess_mode="livemax",
)
LLM_API_REQUEST_DURATION = Histogram(
    "llm_api_request_duration_seconds",
    "Duration of LLM API requests, by outcome.",
    ["outcome"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0),
)
MESSAGES_SENT_TO_DLQ = Counter(
    "messages_sent_to_dlq_total",
    "Messages routed to the dead-letter queue, by reason.",
    ["reason"],
)
CELERY_TASKS_PENDING = Gauge(
    "celery_tasks_pending",
    "Messages waiting in a Celery queue.",
    ["queue"],
    multiprocess_mode="mostrecent",
)
AURA_OUTBOX_HELD = Gauge(  # the fair dispatcher's backlog (aura.gateway.dispatch)
    "aura_outbox_held_messages",
    "Import messages held in the outbox for fair dispatch, by work queue.",
    ["queue"],
    multiprocess_mode="mostrecent",
)
AURA_OUTBOX_HELD_TENANTS = Gauge(
    "aura_outbox_held_tenants",
    "Tenants with messages held for fair dispatch, by work queue (no tenant ids).",
    ["queue"],
    multiprocess_mode="mostrecent",
)
AURA_DLQ_MESSAGES = Gauge(
    "aura_dlq_messages",
    "Messages in the dead-letter queue now, read from the broker by the workers' poller.",
    multiprocess_mode="mostrecent",
)

AURA_DLQ_LETTERS_DROPPED = Counter(
    "aura_dlq_letters_dropped_total",
    "Dead letters the DLQ store's retention bound removed (DLQ_RETENTION_*), by reason.",
    ["reason"],
)

AURA_LLM_BREAKER_OPENS = Counter(
    "aura_llm_circuit_breaker_opens_total",
    "Transitions of an LLM circuit breaker to open, per breaker (provider and model).",
    ["breaker"],
)
AURA_LLM_REQUESTS = Counter(
    "aura_llm_requests_total",
    "LLM calls that reached the provider, by model and outcome.",
    ["model", "outcome"],
)
AURA_LLM_TOKENS = Counter(
    "aura_llm_tokens_total",
    "Tokens the provider reported using, by model: prompt or completion.",
    ["model", "kind"],
)

AURA_LLM_RATE_LIMIT = Counter(
    "aura_llm_rate_limit_total",
    "Fleet-wide LLM rate limiter: calls admitted or deferred, 429s met, AIMD decreases.",
    ["limiter", "outcome"],
)
AURA_LLM_RATE_LIMIT_WAIT = Histogram(
    "aura_llm_rate_limit_wait_seconds",
    "Seconds an admitted LLM call waited for its rate-limit slot.",
    ["limiter"],
    buckets=(0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
AURA_LLM_RATE_LIMIT_RPM = Gauge(
    "aura_llm_rate_limit_rpm",
    "Requests per minute the fleet-wide LLM rate limiter applies now (adaptive share).",
    ["limiter"],
    multiprocess_mode="mostrecent",
)
AURA_LLM_RATE_LIMIT_TPM = Gauge(
    "aura_llm_rate_limit_tpm",
    "Tokens per minute the fleet-wide LLM rate limiter applies now (adaptive share).",
    ["limiter"],
    multiprocess_mode="mostrecent",
)
AURA_LLM_BUDGET_TOKENS = Counter(
    "aura_llm_budget_tokens_total",
    "Tokens charged to tenants' LLM budgets: the usage providers reported, else estimates.",
)
AURA_LLM_BUDGET_DEFERRALS = Counter(
    "aura_llm_budget_deferrals_total",
    "LLM calls refused (not made, the task deferred) over a tenant's token budget, by window.",
    ["window"],
)

AURA_DEPENDENCY_AVAILABLE = Gauge(
    "aura_dependency_available",
    "1 while a worker process's outage gate for the dependency is open, 0 while it holds "
    "deliveries (the lowest process wins).",
    ["dependency"],
    multiprocess_mode="livemin",
)
AURA_BROKER_ACK_FAILURES = Counter(
    "aura_broker_ack_failures_total",
    "Acks or rejects lost with the broker connection (the message is redelivered).",
)

AURA_TASK_OUTCOMES = Counter(
    "aura_task_outcomes_total",
    "Deliveries of resilient tasks by task and outcome (reason: the dead letter's).",
    ["task", "outcome", "reason"],
)
AURA_TASK_OUTCOMES_BY_TENANT = Counter(
    "aura_task_outcomes_by_tenant_total",
    "Deliveries of resilient tasks by tenant (named in METRICS_TENANTS, else other) and outcome.",
    ["tenant", "outcome"],
)
AURA_TASK_DURATION = Histogram(
    "aura_task_duration_seconds",
    "Time of one delivery of a resilient task, from its start to its fate.",
    ["task"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
)
AURA_TASK_REDELIVERIES = Counter(
    "aura_task_redeliveries_total",
    "Deliveries whose last run never finished (its worker killed, or the connection lost).",
    ["task"],
)

AURA_TASK_RETRIES = Counter(
    "aura_task_retries_total",
    "Task executions put off for another try: retry (transient) or deferral (open circuit).",
    ["kind"],
)

AURA_DUPLICATE_DELIVERIES = Counter(
    "aura_duplicate_deliveries_total",
    "Deliveries whose fate was already settled: effect committed, or dead letter written.",
    ["kind"],
)

CELERY_TASK_TIMEOUTS = Counter(
    "celery_task_timeouts_total",
    "Tasks past a time limit: soft (cancelled, cleaned up, retried) or hard (process killed).",
    ["kind"],
)

for _finished in TaskOutcome:
    AURA_TASK_OUTCOMES_BY_TENANT.labels(tenant=OTHER, outcome=_finished.value)
for _kind in RetryKind:
    AURA_TASK_RETRIES.labels(kind=_kind.value)
for _duplicate in DuplicateKind:
    AURA_DUPLICATE_DELIVERIES.labels(kind=_duplicate.value)
for _timeout in TimeoutKind:
    CELERY_TASK_TIMEOUTS.labels(kind=_timeout.value)
for _reason in RollbackReason:
    DATABASE_TRANSACTION_ROLLBACKS.labels(reason=_reason.value)
for _outcome in LLMOutcome:
    LLM_API_REQUEST_DURATION.labels(outcome=_outcome.value)
for _dlq_reason in DeadLetterReason:
    MESSAGES_SENT_TO_DLQ.labels(reason=_dlq_reason.value)
    AURA_DLQ_LETTERS_DROPPED.labels(reason=_dlq_reason.value)
for _window in BudgetWindow:
    AURA_LLM_BUDGET_DEFERRALS.labels(window=_window.value)
for _dependency in Dependency:
    AURA_DEPENDENCY_AVAILABLE.labels(dependency=_dependency.value).set(1)


def expect_queues(names: Iterable[str]) -> None:
    """Show ``celery_tasks_pending`` for these queues (0 until read) from now on: an app's
    own queues (``aura.messaging.configure``), never another app's; the platform names
    realtime_queue and bulk_queue (a user's app listed them although it had neither)."""
    for name in names:
        CELERY_TASKS_PENDING.labels(queue=str(name))


def prometheus_hook(event: Event) -> None:
    """Turn one instrumentation event into metric updates."""
    match event:
        case TransactionRolledBack(reason=reason):
            DATABASE_TRANSACTION_ROLLBACKS.labels(reason=reason.value).inc()
        case PoolConnectionsChanged(delta=delta):
            SQLALCHEMY_POOL_CONNECTIONS_ACTIVE.inc(delta)
        case CircuitBreakerOpened(breaker=breaker):
            LLM_CIRCUIT_BREAKER_OPENS.inc()
            AURA_LLM_BREAKER_OPENS.labels(breaker=breaker).inc()
        case CircuitStateChanged(breaker=breaker, state=state):
            LLM_CIRCUIT_BREAKER_STATE.labels(breaker=breaker).set(CIRCUIT_STATE_VALUES[state])
        case LLMRequestFinished(outcome=outcome, duration_s=duration_s, model=model):
            LLM_API_REQUEST_DURATION.labels(outcome=outcome.value).observe(duration_s)
            if model:
                AURA_LLM_REQUESTS.labels(model=model, outcome=outcome.value).inc()
                if event.prompt_tokens or event.completion_tokens:
                    AURA_LLM_TOKENS.labels(model=model, kind="prompt").inc(event.prompt_tokens)
                    AURA_LLM_TOKENS.labels(model=model, kind="completion").inc(
                        event.completion_tokens
                    )
        case LLMRateLimited(limiter=limiter, outcome=limited, wait_s=wait_s):
            AURA_LLM_RATE_LIMIT.labels(limiter=limiter, outcome=limited.value).inc()
            if limited is RateLimitOutcome.ADMITTED:
                AURA_LLM_RATE_LIMIT_WAIT.labels(limiter=limiter).observe(wait_s)
        case LLMRateLimitChanged(limiter=limiter, rpm=rpm, tpm=tpm):
            AURA_LLM_RATE_LIMIT_RPM.labels(limiter=limiter).set(rpm)
            AURA_LLM_RATE_LIMIT_TPM.labels(limiter=limiter).set(tpm)
        case LLMBudgetCharged(tokens=tokens):
            AURA_LLM_BUDGET_TOKENS.inc(tokens)
        case LLMBudgetRefused(window=window):
            AURA_LLM_BUDGET_DEFERRALS.labels(window=window.value).inc()
        case MessageDeadLettered(reason=reason):
            MESSAGES_SENT_TO_DLQ.labels(reason=reason.value).inc()
        case DeadLettersDropped(reason=dropped, count=count):
            AURA_DLQ_LETTERS_DROPPED.labels(reason=dropped).inc(count)
        case DuplicateDelivered(kind=duplicate):
            AURA_DUPLICATE_DELIVERIES.labels(kind=duplicate.value).inc()
        case TaskRetried(kind=kind):
            AURA_TASK_RETRIES.labels(kind=kind.value).inc()
        case TaskTimedOut(kind=timeout):
            CELERY_TASK_TIMEOUTS.labels(kind=timeout.value).inc()
        case QueueDepthObserved(queue=queue, pending=pending):
            CELERY_TASKS_PENDING.labels(queue=str(queue)).set(pending)
        case DeadLetterDepthObserved(messages=messages):
            AURA_DLQ_MESSAGES.set(messages)
        case DependencyGateChanged(dependency=dependency, available=available):
            AURA_DEPENDENCY_AVAILABLE.labels(dependency=dependency.value).set(int(available))
        case TaskFinished(task=task, outcome=finished, duration_s=duration_s, reason=why):
            AURA_TASK_OUTCOMES.labels(task=task, outcome=finished.value, reason=why).inc()
            by_tenant = tenant_label(event.tenant)  # an id only where METRICS_TENANTS names it
            AURA_TASK_OUTCOMES_BY_TENANT.labels(tenant=by_tenant, outcome=finished.value).inc()
            AURA_TASK_DURATION.labels(task=task).observe(duration_s)
        case TaskRedelivered(task=task):
            AURA_TASK_REDELIVERIES.labels(task=task).inc()
        case BrokerAckFailed():
            AURA_BROKER_ACK_FAILURES.inc()


def exposition_registry() -> CollectorRegistry:
    """What a /metrics endpoint serves: this process's registry, or, in multiprocess mode
    (``PROMETHEUS_MULTIPROC_DIR`` set, prefork workers), the sum of every process's files."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return REGISTRY
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


events.add_hook(prometheus_hook)
