"""A run's queue depths once a second, over AMQP: a passive declare of each queue the run
knows of, on one connection kept open between reads.

``rabbitmqctl list_queues`` (``aura.chaos.accounting.queue_depths``, what the accounting
reads once the run is over) costs about a second and 0.75 s of CPU a call: a report sampled
with it sees a queue every 5 s. A passive declare is one round trip and changes nothing:
31 of them (the work queues, the DLQ and the 28 delayed-delivery levels) cost a few ms.

A passive declare counts the messages **ready** in a queue (not those delivered and not yet
acknowledged). A queue that does not exist (a work queue or a delayed-delivery level before
the worker declared them) answers 404, which closes the channel: it is skipped, and asked
again after 1 s, then 2, 4 and 8, then every 10 s (each 404 is a line in the broker's log).
A broker that cannot be reached makes the read raise: the sampler leaves a gap.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from kombu.connection import Connection
from kombu.exceptions import OperationalError
from kombu.transport.native_delayed_delivery import MAX_LEVEL, level_name

from aura.messaging.topology import DEAD_LETTER_QUEUE
from aura.timeline.sampler import Source, queue_source

__all__ = ["QueueProbe", "delayed_levels", "probe_source"]

_MISSING_FIRST_S = 1.0  # a queue not there yet is asked again after 1 s, 2 s, 4 s ... 10 s
_MISSING_CAP_S = 10.0


def delayed_levels() -> list[str]:
    """Celery's native delayed-delivery queues (``celery_delayed_0`` to ``_27``)."""
    return [level_name(level) for level in range(MAX_LEVEL + 1)]


def probe_source(url: str, app: Any) -> Source:
    """The ``queues`` source of a run publishing with the Celery ``app`` on ``url``: its
    work queues, the DLQ and the delayed-delivery levels, once a second."""
    names = [queue.name for queue in app.conf.task_queues or ()]
    probe = QueueProbe(url, [*names, DEAD_LETTER_QUEUE, *delayed_levels()])
    return queue_source(probe, close=probe.close)


class QueueProbe:
    """``probe()``: ``{queue: ready messages}`` for ``names`` on ``url``'s broker."""

    def __init__(
        self,
        url: str,
        names: Sequence[str],
        *,
        connect_timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.names = list(dict.fromkeys(names))
        self.connect_timeout = connect_timeout
        self.clock = clock
        self._connection: Any = None  # kombu's Connection (untyped)
        self._channel: Any = None
        self._missing: dict[str, tuple[float, float]] = {}  # name -> (ask again at, delay)

    def __call__(self) -> dict[str, int]:
        channel = self._open()
        depths: dict[str, int] = {}
        now = self.clock()
        for name in self.names:
            again_at, delay = self._missing.get(name, (now, 0.0))
            if again_at > now:
                continue
            try:
                _, ready, _ = channel.queue_declare(queue=name, passive=True)
            except Exception as exc:
                if not _not_found(exc):
                    self.close()  # the connection is gone: reconnect at the next read
                    raise
                delay = min(_MISSING_CAP_S, 2 * delay) if delay else _MISSING_FIRST_S
                self._missing[name] = (now + delay, delay)
                channel = self._channel = self._connection_or_raise().channel()
                continue
            self._missing.pop(name, None)
            depths[name] = int(ready)
        return depths

    def _connection_or_raise(self) -> Any:
        if self._connection is None:
            raise OperationalError("the probe's connection is closed")
        return self._connection

    def _open(self) -> Any:
        if self._channel is None:
            connection: Any = Connection(self.url, connect_timeout=self.connect_timeout)  # type: ignore[no-untyped-call]
            try:
                connection.connect()
                self._channel = connection.channel()
            except Exception:
                connection.release()
                raise
            self._connection = connection
        return self._channel

    def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):  # already broken: nothing to give back
                connection.release()


def _not_found(exc: BaseException) -> bool:
    """A 404 NOT_FOUND channel close: the queue does not exist (the connection lives)."""
    return getattr(exc, "reply_code", None) == 404 or getattr(exc, "code", None) == 404
