"""The chaos suite's worker module: the platform's tasks, plus one that kills its worker.

``celery -A aura.chaos.tasks worker`` serves ``aura.ingest_product``,
``aura.enrich_product`` and ``aura.chaos.crash`` (SIGKILLs its own process on every
delivery: the "message that kills its worker every time" of scenario ``killer``).
"""

from __future__ import annotations

import os
import signal

from celery import Task

from aura.messaging import resilient_task
from aura.messaging.topology import REALTIME_QUEUE
from aura.worker.tasks import app, enrich_product, ingest_product

__all__ = ["CRASH_TASK", "app", "crash", "enrich_product", "ingest_product"]

CRASH_TASK = "aura.chaos.crash"


@resilient_task(name=CRASH_TASK, queue=REALTIME_QUEUE)
def crash(self: Task, tenant_id: str) -> None:
    """Die the hardest way a worker process can: no cleanup, no ack."""
    os.kill(os.getpid(), signal.SIGKILL)
