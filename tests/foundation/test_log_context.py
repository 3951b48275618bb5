"""Every log line of a delivery carries its task, message id, tenant and retry count
(structlog context variables, bound around the delivery and seen inside ``async def``
tasks too); they are gone once the delivery ends."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from typing import Any

import structlog

from aura.config import load_settings
from aura.messaging import resilient_task
from aura.worker.celery_app import make_celery_app


def _eager_app() -> Any:
    app = make_celery_app(load_settings())
    app.conf.task_always_eager = True
    return app


def test_a_delivery_binds_its_context_for_sync_and_async_tasks() -> None:
    app = _eager_app()
    seen: list[dict[str, Any]] = []

    @resilient_task(app=app, name="tests.ctx_sync")
    def ctx_sync(self: object, tenant_id: str) -> None:
        seen.append(structlog.contextvars.get_contextvars())

    @resilient_task(app=app, name="tests.ctx_async")
    async def ctx_async(self: object, tenant_id: str) -> None:
        seen.append(structlog.contextvars.get_contextvars())

    tenant = str(uuid.uuid4())
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    ctx_sync.apply(args=(tenant,), task_id=first).get()
    ctx_async.apply(args=(tenant,), task_id=second).get()
    assert seen == [
        {"task": "tests.ctx_sync", "message_id": first, "retries": 0, "tenant": tenant},
        {"task": "tests.ctx_async", "message_id": second, "retries": 0, "tenant": tenant},
    ]
    assert structlog.contextvars.get_contextvars() == {}  # nothing left behind


def test_rendered_lines_carry_the_context() -> None:
    """Aura's own logging (``configure_logging``) merges the bound fields into each line,
    the standard library's records (Celery's, say) included."""
    probe = (
        "import io, logging, sys, structlog\n"
        "from aura.logs import configure_logging\n"
        "out = io.StringIO()\n"
        "configure_logging('INFO', 'json', stream=out)\n"
        "with structlog.contextvars.bound_contextvars(task='t', message_id='m-1'):\n"
        "    structlog.get_logger('probe').info('working')\n"
        "    logging.getLogger('celery.probe').warning('stdlib')\n"
        "sys.stdout.write(out.getvalue())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(x["event"], x["task"], x["message_id"]) for x in lines] == [
        ("working", "t", "m-1"),
        ("stdlib", "t", "m-1"),
    ]
