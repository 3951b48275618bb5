"""One retry policy: exponential backoff, capped, optionally half jittered, Retry-After
honoured. Every backoff in Aura is one of these, so a pause is tuned in one place.

    Backoff(base=1, cap=60).delay(attempt)     attempt 1, 2, 3 ... -> ~1, 2, 4 ... <= 60 s
    Backoff.from_settings(settings)            RETRY_BACKOFF_BASE / RETRY_BACKOFF_MAX

=====================================  ======  =====  ======  ==========================
who                                    base    cap    jitter  floor
=====================================  ======  =====  ======  ==========================
a task's retry (``resilient_task``)    1 s     60 s   half    1 s (RabbitMQ's delay unit)
a deferral while the database is out   1 s     10 s   half    1 s
the outage gate's trials               0.1 s   1 s    half    --
a statement waiting out an outage      0.1 s   1 s    none    --
an ``on_dead_letter`` hook retried     0.25 s  1 s    none    --
=====================================  ======  =====  ======  ==========================

Half jitter (``ceiling / 2 + uniform(0, ceiling / 2)``) keeps a fleet that failed together
from retrying together while still growing the pause; the exponent is bounded so a
large attempt number never overflows a float. A ``Retry-After`` the server sent is a
floor, never shortened.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aura.errors import ConfigurationError

if TYPE_CHECKING:
    from aura.config import Settings

__all__ = ["Backoff"]

_MAX_EXPONENT = 64  # 2**64 seconds is already past any cap: no float overflow beyond it


@dataclass(frozen=True, slots=True)
class Backoff:
    """Seconds to wait before attempt ``n`` (1, 2, ...): ``base * 2**(n-1)``, at most
    ``cap``, half jittered unless ``jitter`` is False, at least ``floor``."""

    base: float = 1.0
    cap: float = 60.0
    jitter: bool = True
    floor: float = 0.0

    def __post_init__(self) -> None:
        if self.base < 0 or self.cap < 0 or self.floor < 0:
            raise ConfigurationError("a backoff's base, cap and floor are seconds, not negative")

    @classmethod
    def from_settings(cls, settings: Settings) -> Backoff:
        """A task's retry backoff: RETRY_BACKOFF_BASE doubling to RETRY_BACKOFF_MAX."""
        return cls(base=settings.retry_backoff_base, cap=settings.retry_backoff_max)

    def ceiling(self, attempt: int) -> float:
        """The pause before ``attempt`` without jitter."""
        exponent = min(max(attempt - 1, 0), _MAX_EXPONENT)
        return min(self.cap, self.base * 2.0**exponent)

    def delay(
        self,
        attempt: int,
        rng: random.Random | None = None,
        *,
        retry_after: float | None = None,
    ) -> float:
        """Seconds before ``attempt``; ``retry_after`` (a server's word) is a floor."""
        ceiling = self.ceiling(attempt)
        if self.jitter:
            ceiling = ceiling / 2 + (rng or random).uniform(0, ceiling / 2)
        if retry_after is not None and retry_after > 0:
            ceiling = max(ceiling, retry_after)
        return max(ceiling, self.floor)
