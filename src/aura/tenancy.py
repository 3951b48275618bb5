"""Tenants' fair share of a resource: their weights (TENANT_WEIGHTS) and deficit round robin.

``FairShare.quotas(backlog, room)`` splits ``room`` units (messages the broker's queue has
room for) among the tenants with a backlog, in proportion to their weights, max-min fair:
a tenant that wants less than its share gets all it wants and the rest is shared again
among the others. Fractions carry over as each tenant's deficit (deficit round robin,
Shreedhar and Varghese), so a tenant whose share of one round is 0.3 gets one unit every
few rounds: none starves, however many tenants share a small room. A tenant with nothing
waiting loses its deficit (it cannot bank rounds it did not need).

    backlog {A: 20000, B: 10}, room 200, equal weights  ->  {A: 190, B: 10}
    backlog {A: 20000, B: 5000}, room 200, A weight 3  ->  {A: 150, B: 50}
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Hashable, Mapping
from typing import Generic, TypeVar

__all__ = ["FairShare", "parse_tenant_weights"]

K = TypeVar("K", bound=Hashable)


def parse_tenant_weights(text: str) -> dict[str, float]:
    """``"<uuid>=2, <uuid>=0.5"`` as {"<uuid>": 2.0, ...}; ``ValueError`` naming what is
    wrong (a weight is a finite number > 0; a tenant appears once)."""
    weights: dict[str, float] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        tenant, sep, number = (part.strip() for part in entry.partition("="))
        try:
            key = str(uuid.UUID(tenant))
        except ValueError:
            raise ValueError(f"{tenant!r} is not a tenant id (a UUID)") from None
        try:
            weight = float(number) if sep else math.nan
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"{tenant}: the weight must be a number > 0, got {number!r}")
        if key in weights:
            raise ValueError(f"{tenant} appears twice")
        weights[key] = weight
    return weights


class FairShare(Generic[K]):
    """Deficit round robin over tenants' backlogs (see the module's docstring).
    ``weight(tenant)`` is a number > 0 (1 unless configured)."""

    def __init__(self, weight: Callable[[K], float] = lambda tenant: 1.0) -> None:
        self._weight = weight
        self._deficit: dict[K, float] = {}

    def quotas(self, backlog: Mapping[K, int], room: int) -> dict[K, int]:
        """How many of each tenant's waiting units go now: never more than it has waiting,
        never more than ``room`` in all, all of ``room`` when enough waits."""
        wanting = {tenant: count for tenant, count in backlog.items() if count > 0}
        self._deficit = {t: d for t, d in self._deficit.items() if t in wanting}
        granted = dict.fromkeys(wanting, 0)
        left = max(room, 0)
        while left > 0 and wanting:
            total = sum(self._weight(t) for t in wanting)
            share = {t: left * self._weight(t) / total for t in wanting}
            content = [t for t in wanting if wanting[t] <= share[t] + self._deficit.get(t, 0.0)]
            if content:  # they get all they want; share what is left among the rest again
                for tenant in content:
                    units = wanting.pop(tenant)
                    granted[tenant] += units
                    left -= units
                    self._deficit.pop(tenant, None)
                continue
            for tenant in wanting:
                owed = self._deficit.get(tenant, 0.0) + share[tenant]
                units = min(math.floor(owed), left, wanting[tenant])
                granted[tenant] += units
                wanting[tenant] -= units
                left -= units
                self._deficit[tenant] = owed - units
            while left > 0 and (hungry := [t for t in wanting if wanting[t] > 0]):
                tenant = max(hungry, key=lambda t: self._deficit[t])  # the remainder, one
                granted[tenant] += 1  # unit at a time, to whom it is owed most
                wanting[tenant] -= 1
                left -= 1
                self._deficit[tenant] -= 1.0
            break
        return {tenant: units for tenant, units in granted.items() if units > 0}
