"""Tenants as metric labels, in a number of series that does not grow with the tenants.

A metric's label values come from small fixed sets (DESIGN.md, invariant 6), and tenants
are not one: a platform may have thousands. So a tenant's id becomes a label value only
where ``METRICS_TENANTS`` names it (an operator's short list of the tenants worth a series
of their own, at most ``MAX_NAMED``); every other tenant is ``other``, and work that names
no tenant is ``none``. Unset (the default), no tenant id is ever a label value:

    METRICS_TENANTS unset         tenant="other" | "none"
    METRICS_TENANTS=3f2a...       tenant="3f2a..." | "other" | "none"

``tenant_label`` runs once per delivery (``aura_task_outcomes_by_tenant_total``), so it
does no I/O: the setting is parsed once per ``Settings`` and a label is one set lookup (a
UUID parse more only for an id written in another case or form while tenants are named).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable

from aura.errors import AuraError

__all__ = [
    "MAX_NAMED",
    "NONE",
    "OTHER",
    "check_metrics_tenants",
    "named_tenants",
    "parse_metrics_tenants",
    "tenant_label",
]

OTHER = "other"
"""The label of every tenant METRICS_TENANTS does not name."""
NONE = "none"
"""The label of work that names no tenant (a task without a ``tenant_id`` argument)."""
MAX_NAMED = 100
"""At most this many tenants get a series of their own."""

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_named: tuple[object, frozenset[str]] = (None, frozenset())
_settings: Callable[[], object] | None = None  # aura.config.get_settings, once imported


def _canonical(tenant: str) -> str:
    """A UUID in its canonical text; any other id as it is."""
    try:
        return str(uuid.UUID(tenant)) if len(tenant) >= 32 else tenant
    except ValueError:
        return tenant


def parse_metrics_tenants(text: str) -> frozenset[str]:
    """``"<uuid>, <uuid>"`` as a set of tenant ids (a UUID in its canonical text; another
    id of up to 64 letters, digits and ``_.:-`` as written); ``ValueError`` naming what is
    wrong."""
    named: set[str] = set()
    for entry in filter(None, (part.strip() for part in text.split(","))):
        if not _ID.fullmatch(entry) or entry in (OTHER, NONE):
            raise ValueError(f"{entry[:40]!r} is not a tenant id (a UUID)")
        named.add(_canonical(entry))
    if len(named) > MAX_NAMED:
        raise ValueError(f"at most {MAX_NAMED} tenants may be named, got {len(named)}")
    return frozenset(named)


def check_metrics_tenants(text: str) -> str:
    """Settings' validator of METRICS_TENANTS: the ids in canonical form, sorted."""
    return ",".join(sorted(parse_metrics_tenants(text)))


def named_tenants() -> frozenset[str]:
    """The tenants METRICS_TENANTS names (parsed once per ``Settings``); none while the
    settings cannot be read (the process reports that itself)."""
    global _named, _settings
    if _settings is None:  # here: config validates METRICS_TENANTS with this module
        from aura.config import get_settings

        _settings = get_settings
    try:
        settings = _settings()
    except AuraError:
        return frozenset()
    if _named[0] is not settings:
        _named = (settings, parse_metrics_tenants(getattr(settings, "metrics_tenants", "")))
    return _named[1]


def tenant_label(tenant_id: object) -> str:
    """The label value for work of ``tenant_id``: the id if METRICS_TENANTS names it,
    else ``other`` (``none`` for work of no tenant)."""
    if tenant_id is None:
        return NONE
    named = named_tenants()
    if not named:
        return OTHER
    text = str(tenant_id)
    if text in named:
        return text
    canonical = _canonical(text)
    return canonical if canonical in named else OTHER
