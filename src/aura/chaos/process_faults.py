"""The scenarios where worker processes die: SIGKILLed mid-task, past the hard time limit,
or killed by the very message they run (that one, and only it, ends as worker_lost)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from pathlib import Path
from typing import ClassVar

from aura.chaos.accounting import Accounting, Sent
from aura.chaos.expectations import all_committed, expect_letters, extra_calls
from aura.chaos.run import ChaosRun
from aura.contract import REALTIME_QUEUE
from aura.llm import Faults

__all__ = ["HangingTasks", "Killer", "WorkerKills"]


# 5 ----------------------------------------------------------------------------------
def _children(pid: int | None) -> list[int]:
    if pid is None:
        return []
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


class WorkerKills(ChaosRun):
    worker_pool = "prefork"  # it kills the pool's children
    name = "worker-kill"
    summary = "a worker process SIGKILLed mid-task, repeatedly → nothing lost or doubled"
    expected_fates = "all committed once; extra LLM calls at most one per kill"
    faults = Faults(latency=0.02)  # tasks take long enough to be killed mid-flight
    environment: ClassVar[dict[str, str]] = {"RETRY_TRACKER_MAX_RETRIES": "6"}
    kills = 6

    async def fault(self) -> None:
        self.details["processes_killed"] = 0
        for _ in range(self.kills):
            await asyncio.sleep(0.5 + self.rng.random())
            children = _children(self.worker_pid)
            if children:
                with contextlib.suppress(ProcessLookupError):
                    victim = self.rng.choice(children)
                    os.kill(victim, signal.SIGKILL)
                    self.details["processes_killed"] += 1
                    self.recorder.mark(f"SIGKILL pool process {victim}")

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        failures = all_committed(accounting, self.records)
        if not self.details.get("processes_killed"):
            failures.append("no worker process was killed")
        return failures + extra_calls(accounting, self.details.get("processes_killed", 0))


class _WorkerKillingMessage(ChaosRun):
    """Besides the records, one message whose every delivery ends with its worker process
    dead (``killing_task``, from ``aura.chaos.tasks``): expected in the DLQ as
    worker_lost, the only dead letter."""

    killing_task: ClassVar[str]
    worker_module_name = "aura.chaos.tasks"
    worker_pool = "prefork"  # its tasks are def tasks that kill or outlive their process
    expected_fates = "records committed once; the killing message worker_lost"

    async def before_load(self) -> None:
        killing_id = f"{self.killing_task.rsplit('.', 1)[-1]}-{uuid.uuid4().hex}"
        await asyncio.to_thread(
            self.publisher.send_task,
            self.killing_task,
            args=[str(self.tenant_id)],
            task_id=killing_id,
            queue=REALTIME_QUEUE,
        )
        self.sent.append(Sent(killing_id))

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        return expect_letters(accounting, len(self.records), {"worker_lost": 1})


# 6 ----------------------------------------------------------------------------------
class HangingTasks(_WorkerKillingMessage):
    name = "hanging"
    summary = "hanging tasks → soft limit (cancelled, retried), hard limit (killed, recycled)"
    default_products = 100
    faults = Faults(latency=0.005, hang_rate=0.1, hang_seconds=6.0)
    killing_task = "aura.chaos.stubborn"  # swallows the soft limit: killed at the hard one
    # The soft limit, not the HTTP client, must end the hanging calls here.
    environment: ClassVar[dict[str, str]] = {
        "CELERY_TASK_SOFT_TIME_LIMIT": "2",
        "CELERY_TASK_HARD_TIME_LIMIT": "4",
        "LLM_READ_TIMEOUT": "30",
        "LLM_CALL_DEADLINE": "30",
    }

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        failures = super().expect(accounting, metrics)
        if metrics["soft_timeouts"] == 0:
            failures.append("no task reached the soft time limit")
        if metrics["hard_timeouts"] == 0:
            failures.append("no process was killed at the hard time limit")
        return failures


# 7 ----------------------------------------------------------------------------------
class Killer(_WorkerKillingMessage):
    name = "killer"
    summary = "a message that kills its worker every time → DLQ after bounded deliveries"
    default_products = 100
    killing_task = "aura.chaos.crash"  # SIGKILLs its own process
