"""The chaos suite's worker module: the platform's tasks, plus one that kills its worker.

``celery -A aura.chaos.tasks worker`` serves ``aura.ingest_product``,
``aura.enrich_product``, ``aura.chaos.crash`` (SIGKILLs its own process on every
delivery: the "message that kills its worker every time" of scenario ``killer``) and
``aura.chaos.stubborn`` (ignores the soft time limit, so the hard limit kills its process:
scenario ``hanging``).
"""

from __future__ import annotations

import os
import signal
import time

from billiard.exceptions import SoftTimeLimitExceeded
from celery import Task

from aura.contract import REALTIME_QUEUE
from aura.messaging import resilient_task
from aura.worker.tasks import app, enrich_product, ingest_product

__all__ = [
    "CRASH_TASK",
    "STUBBORN_TASK",
    "app",
    "crash",
    "enrich_product",
    "ingest_product",
    "stubborn",
]

CRASH_TASK = "aura.chaos.crash"
STUBBORN_TASK = "aura.chaos.stubborn"


@resilient_task(name=CRASH_TASK, queue=REALTIME_QUEUE)
def crash(self: Task, tenant_id: str) -> None:
    """Die the hardest way a worker process can: no cleanup, no ack."""
    os.kill(os.getpid(), signal.SIGKILL)


@resilient_task(name=STUBBORN_TASK, queue=REALTIME_QUEUE)
def stubborn(self: Task, tenant_id: str) -> None:
    """Hang, and swallow the soft time limit: only the hard limit (a killed process) ends
    it, on every delivery."""
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        try:
            time.sleep(0.1)
        except SoftTimeLimitExceeded:
            continue
