"""A worker whose consumer fails as it starts: ``python -m tests.broken_worker`` must exit
non-zero (Celery's ``worker_main`` used to drop the status: exit 0)."""

from __future__ import annotations

import sys
from typing import Any

from aura.messaging.envelope import GuardedConsumer
from aura.worker.celery_app import make_celery_app
from aura.worker.process import run_worker


class BrokenConsumer(GuardedConsumer):
    def start(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the consumer cannot start (a test's fault)")


if __name__ == "__main__":
    app = make_celery_app()
    app.conf.worker_consumer = "tests.broken_worker:BrokenConsumer"
    sys.exit(run_worker(app, ["--pool=solo", "--without-gossip", "--without-mingle"]))
