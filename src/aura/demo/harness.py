"""What a run borrows from its process for a while and gives back: its log handlers'
stream, its environment (and the settings read from it), a background task; and the
Prometheus counters it reads back at the end."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry

from aura.config import get_settings

__all__ = ["cancelled_at_exit", "environment", "logs_to", "metric_total"]


@contextlib.contextmanager
def logs_to(path: Path) -> Iterator[None]:
    """Send this process's logs to ``path`` for the run: the progress bar and the report
    stay readable, and every retry, deferral and dead letter is still written down."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)]
    path.write_text("", encoding="utf-8")  # a new run's log; appended to from here on,
    with path.open("a", encoding="utf-8") as stream:  # as the workers' lines are (else
        # this stream's own offset wrote over theirs: a chaos log kept none of them)
        saved = [handler.setStream(stream) for handler in handlers]
        try:
            yield
        finally:
            for handler, original in zip(handlers, saved, strict=True):
                handler.setStream(original)


@contextlib.asynccontextmanager
async def cancelled_at_exit(task: asyncio.Task[None]) -> AsyncIterator[None]:
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in this process's environment for the block (Settings read again on
    the way in and out); what was there before comes back after."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    get_settings.cache_clear()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        get_settings.cache_clear()


def metric_total(registry: CollectorRegistry, name: str, **labels: str) -> int:
    """The sum of ``name``'s samples in ``registry`` that carry ``labels``."""
    total = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return int(total)
