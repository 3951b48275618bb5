"""What the app's tasks say about a dead letter: the tenant its arguments are for (filing)
and whether it may be replayed (``task_checks``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aura.logs import bounded_text
from aura.messaging.dlq._letter import DeadLetter

ReplayCheck = Callable[[DeadLetter], "str | None"]


def registered(app: Any, name: str) -> Any:
    """``app``'s task ``name``, if registered; never finalizes the app (``app.tasks``
    would, binding every shared task of the process to it)."""
    if app is None or not name:
        return None
    registry = app.tasks if app.finalized else getattr(app, "_tasks", {})
    return registry.get(name)


def forged(filed: str | None, found: Any) -> str | None:
    """Why a letter filed under tenant ``filed`` whose arguments are for ``found`` is
    refused; None when they agree or either is unknown."""
    if found is None or filed is None or str(found) == filed:
        return None
    return (
        f"forged: filed under tenant {bounded_text(filed, 64)!r} "
        f"but its arguments are for tenant {bounded_text(str(found), 64)!r}"
    )


def argument_tenant(app: Any, task: str, args: list[Any], kwargs: dict[str, Any]) -> str | None:
    """The tenant the arguments are for: ``tenant_id`` by name, or by position where the
    task (registered in ``app``) takes a ``tenant_id`` parameter."""
    value = kwargs.get("tenant_id")
    if value is None:
        signature = getattr(registered(app, task), "aura_signature", None)
        if signature is not None:
            try:
                bound = signature.bind_partial(*args, **kwargs)
            except TypeError:
                return None
            value = bound.arguments.get("tenant_id")
    return str(value) if value is not None else None


def task_checks(app: Any) -> ReplayCheck:
    """The replay checks ``app``'s tasks bring: the arguments bind to the task, the tenant
    in them is the one the letter is filed under, and the task's own
    ``aura_replay_check(args, kwargs)`` (the platform's ingest: the gateway's record size
    limit). A task ``app`` does not know gets the generic checks only."""

    def check(letter: DeadLetter) -> str | None:
        task = registered(app, letter.task)
        if task is None:
            return None
        signature = getattr(task, "aura_signature", None)
        if signature is not None:
            try:
                bound = signature.bind(*letter.task_args, **letter.task_kwargs)
            except TypeError as exc:
                return f"its arguments do not fit {letter.task}: {bounded_text(str(exc), 200)}"
            refusal = forged(letter.tenant_id, bound.arguments.get("tenant_id"))
            if refusal is not None:
                return refusal
        own = getattr(task, "aura_replay_check", None)
        if callable(own):
            found = own(list(letter.task_args), dict(letter.task_kwargs))
            return str(found) if found else None
        return None

    return check
