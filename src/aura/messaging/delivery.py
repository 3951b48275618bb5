"""One delivery of a resilient task: what the fate rules read, and the task's policy.

A ``Delivery`` is made per run of the task (a redelivery, a retry, a hold at the
outage gate each get a new one) and bundles what every rule used to be passed one by one:
the task and its request, the process's runtime (loop, Redis, trackers), the task's
``TaskPolicy`` and the call's arguments.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
from celery import Task

from aura.backoff import Backoff
from aura.messaging._idempotency import Inbox, message_fingerprint
from aura.messaging._poison import PoisonPillDetector
from aura.messaging._runtime import ProcessRuntime
from aura.messaging.dlq import REPLAY_HEADER, DeadLetter

if TYPE_CHECKING:
    from aura.messaging.fate import Rule

__all__ = [
    "FAILURES_HEADER",
    "TENANT_HEADER",
    "Delivery",
    "TaskPolicy",
    "call_signature",
    "failures_so_far",
    "log_context",
    "replay_count_of",
    "tenant_finder",
    "tenant_header_of",
]

T = TypeVar("T")

# A retried message carries its failures so far: with Redis unable to count, the budget
# is kept from this, not Celery's request.retries (which counts deferrals too: a message
# put off 3 times by an open breaker was dead-lettered on its first real failure).
FAILURES_HEADER = "aura_failures"
# The tenant a message works for, as its publisher knew it: the worker's pool shares its
# task slots fairly by it (``aura.messaging.pool``); a message without one is nobody's.
TENANT_HEADER = "aura_tenant"


@dataclass(frozen=True)
class TaskPolicy:
    """What ``resilient_task``'s options decided for one task."""

    max_retries: int
    poison_pill_detection: bool
    dlq_routing: bool
    backoff: Backoff
    max_deferrals: int
    detector: PoisonPillDetector
    on_dead_letter: Callable[[DeadLetter], Coroutine[Any, Any, None]] | None
    tenant_of: Callable[[tuple[Any, ...], dict[str, Any]], str | None]
    inbox: Inbox | None
    on_duplicate: Callable[..., Coroutine[Any, Any, None]] | None
    rules: Sequence[Rule]
    lookup_first: bool = True


@dataclass(eq=False)
class Delivery:
    task: Task
    policy: TaskPolicy
    runtime: ProcessRuntime
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def request(self) -> Any:
        return self.task.request

    @property
    def name(self) -> str:
        return str(self.task.name)

    @property
    def message_id(self) -> str:
        return str(self.task.request.id)

    @property
    def redelivered(self) -> bool:
        """Its last run never finished (the worker died, or lost the connection)."""
        return bool((self.request.delivery_info or {}).get("redelivered"))

    @property
    def retries(self) -> int:
        """Celery's count of this message's retries and deferrals."""
        return int(getattr(self.request, "retries", 0) or 0)

    @functools.cached_property
    def fingerprint(self) -> str:
        """The payload's fingerprint, as the inbox stores it."""
        known = getattr(self.request, "aura_fingerprint", None)
        if isinstance(known, str):
            return known
        return message_fingerprint(self.name, self.args, self.kwargs)

    @property
    def tenant(self) -> str | None:
        try:
            return self.policy.tenant_of(self.args, self.kwargs)
        except Exception:  # a poison pill's arguments: no tenant to show
            return None

    def run(self, awaitable: Coroutine[Any, Any, T], **limits: bool) -> T:
        """Await ``awaitable`` on the process's loop (``ProcessRuntime.run``)."""
        return self.runtime.run(awaitable, **limits)


def log_context(
    task: Task, policy: TaskPolicy, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> contextlib.AbstractContextManager[Any]:
    """Every log line of this delivery carries its task, message id, tenant (when the
    task has a ``tenant_id``), retry count and whether it is a redelivery (structlog
    context variables: the async pool copies them into the task's coroutine)."""
    request = task.request
    fields: dict[str, Any] = {
        "task": task.name,
        "message_id": request.id,
        "retries": request.retries or 0,
    }
    if (request.delivery_info or {}).get("redelivered"):
        fields["redelivered"] = True
    try:
        tenant = policy.tenant_of(args, kwargs)
    except Exception:  # a poison pill's arguments: no tenant to show
        tenant = None
    if tenant is not None:
        fields["tenant"] = tenant
    return structlog.contextvars.bound_contextvars(**fields)


def call_signature(function: Callable[..., Any], bind: bool) -> inspect.Signature:
    """The parameters a message's arguments must bind to (``self`` left out)."""
    signature = inspect.signature(function)
    if bind:
        parameters = list(signature.parameters.values())[1:]
        signature = signature.replace(parameters=parameters)
    return signature


def tenant_finder(
    function: Callable[..., Any], bind: bool
) -> Callable[[tuple[Any, ...], dict[str, Any]], str | None]:
    """How to find the ``tenant_id`` argument of a call (by keyword or by position), so
    each dead letter names its tenant and ``aura dlq ls --tenant`` finds it."""
    signature = inspect.signature(function)
    named = "tenant_id" in signature.parameters

    def tenant_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        if not named and "tenant_id" not in kwargs:  # bound or not, no tenant: no binding
            return None  # (twice per delivery, it was a visible share of the consumer's CPU)
        try:
            bound = signature.bind_partial(*((None,) if bind else ()), *args, **kwargs)
        except TypeError:  # arguments that do not fit the task (a poison pill, say)
            tenant = kwargs.get("tenant_id")
        else:
            tenant = bound.arguments.get("tenant_id")
        return None if tenant is None else str(tenant)

    return tenant_of


def failures_so_far(request: Any) -> int:
    """The failures this message met before this delivery (its ``aura_failures`` header;
    a message retried by an older worker has none: Celery's retries stand in)."""
    value = getattr(request, FAILURES_HEADER, None)
    if value is None and isinstance(getattr(request, "headers", None), dict):
        value = request.headers.get(FAILURES_HEADER)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return int(getattr(request, "retries", 0) or 0)


def tenant_header_of(request: Any) -> str | None:
    """The tenant a delivery's message names in its header (``TENANT_HEADER``), if any."""
    value = getattr(request, TENANT_HEADER, None)
    if value is None and isinstance(getattr(request, "headers", None), dict):
        value = request.headers.get(TENANT_HEADER)
    return value if isinstance(value, str) and 0 < len(value) <= 64 else None


def replay_count_of(request: Any) -> int:
    """How often this delivery's message was replayed from the DLQ (its header)."""
    value = getattr(request, REPLAY_HEADER, None)
    if value is None and isinstance(getattr(request, "headers", None), dict):
        value = request.headers.get(REPLAY_HEADER)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
