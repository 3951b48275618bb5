"""The scenarios where a dependency runs out: the database's connections, the broker's
memory. Each lives in its own module, with how it is made and what it proves.

    scenario        module            fault
    db-exhausted    db_exhausted      the worker's database connections run out: every
                                      slot taken for 20 s, then 2 free for 15 s, then all
                                      free; half the records are posted as the window opens
    broker-blocked  broker_blocked    the run's own RabbitMQ node raises a memory alarm
                                      (it blocks every connection that publishes) for 40 s,
                                      an import in flight as it starts and more records
                                      posted through it; then the alarm clears
"""

from __future__ import annotations

from aura.chaos.broker_blocked import BrokerBlocked
from aura.chaos.db_exhausted import DatabaseExhausted

__all__ = ["BrokerBlocked", "DatabaseExhausted"]
