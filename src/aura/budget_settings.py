"""Tenants' LLM token budgets as settings read them (``aura.llm.budgets`` enforces them).

    LLM_TENANT_BUDGETS        "<tenant>=<per_minute>/<per_day>, ..."   each tenant's own
    LLM_TENANT_BUDGET_DEFAULT "<per_minute>/<per_day>" or "none"       every other tenant

Each limit is a whole number of tokens > 0, or ``none`` (no limit of that kind):
``"3f2a...=1000/200000, 9b1c...=none/50000"``. A tenant is named as the application names
it (the platform: a UUID, kept in its canonical lower-case form), at most 64 characters of
letters, digits and ``-_.:``.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

__all__ = [
    "TokenBudget",
    "canonical_tenant",
    "check_budget_default",
    "check_tenant_budgets",
    "parse_tenant_budgets",
    "parse_token_budget",
]

_TENANT = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_MAX_TOKENS = 10**15  # a limit Lua's doubles still count exactly


@dataclass(frozen=True, slots=True)
class TokenBudget:
    """Tokens a tenant may spend per minute and per day (None: no limit of that kind)."""

    per_minute: int | None = None
    per_day: int | None = None

    def __post_init__(self) -> None:
        for limit in (self.per_minute, self.per_day):
            if limit is not None and not 0 < limit <= _MAX_TOKENS:
                raise ValueError(f"a token budget is a whole number from 1 to {_MAX_TOKENS}")

    @property
    def enabled(self) -> bool:
        return self.per_minute is not None or self.per_day is not None


def canonical_tenant(tenant: str) -> str:
    """A UUID in its canonical form; any other tenant name as it is."""
    try:
        return str(uuid.UUID(tenant)) if len(tenant) >= 32 else tenant
    except ValueError:
        return tenant


def _limit(text: str, what: str) -> int | None:
    text = text.strip()
    if text.lower() == "none":
        return None
    if not text.isdigit() or not 0 < int(text) <= _MAX_TOKENS:
        raise ValueError(f"{what}: expected a whole number of tokens > 0 or 'none', got {text!r}")
    return int(text)


def parse_token_budget(text: str, what: str = "budget") -> TokenBudget | None:
    """``"1000/200000"`` as ``TokenBudget(1000, 200000)``; ``"none"`` (or nothing) as None;
    ``ValueError`` naming what is wrong."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return None
    per_minute, sep, per_day = text.partition("/")
    if not sep:
        raise ValueError(f"{what}: expected <per_minute>/<per_day> (or none), got {text!r}")
    budget = TokenBudget(
        _limit(per_minute, f"{what} per minute"), _limit(per_day, f"{what} per day")
    )
    return budget if budget.enabled else None


def parse_tenant_budgets(text: str) -> dict[str, TokenBudget | None]:
    """``"<tenant>=1000/200000, <tenant>=none"`` by tenant (None: that tenant has no
    budget, whatever the default); ``ValueError`` naming what is wrong."""
    budgets: dict[str, TokenBudget | None] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        tenant, sep, budget = (part.strip() for part in entry.partition("="))
        if not sep or not _TENANT.fullmatch(tenant):
            raise ValueError(f"expected <tenant>=<per_minute>/<per_day>, got {entry[:60]!r}")
        key = canonical_tenant(tenant)
        if key in budgets:
            raise ValueError(f"{tenant} appears twice")
        budgets[key] = parse_token_budget(budget, tenant)
    return budgets


def check_tenant_budgets(text: str) -> str:
    """Settings' validator of LLM_TENANT_BUDGETS (the text, once it parses)."""
    parse_tenant_budgets(text)
    return text


def check_budget_default(text: str) -> str:
    """Settings' validator of LLM_TENANT_BUDGET_DEFAULT (the text, once it parses)."""
    parse_token_budget(text, "the default")
    return text
