"""How the outbox's messages reach the broker: Celery's protocol 2, confirmed by the broker.

    AmqpSender     aio-pika on the gateway's event loop, a whole batch in flight at once
                   (publisher confirms, mandatory): the gateway's sender for amqp:// URLs
    CelerySender   ``Celery.send_task`` in a worker thread, one confirmed message at a
                   time: any kombu transport (the demo's embedded broker) and test doubles

Why a second sender: under load the gateway's event loop holds the GIL, and a kombu publish
in a thread needs it for every frame, so a request's one confirmed publish took seconds
(200 locust users: 10 products/s served, most of the time waiting on threads). aio-pika
sends a batch of 500 on the loop and awaits their confirms together.

Both build the same message: Celery's own ``amqp.as_task_v2`` makes the headers, the
properties and the body, serialized as JSON the way kombu does; the work queues are
declared as Celery declares them (``aura.messaging.topology``), so a message is routed even
before a worker has started. A message the broker refuses (nack: a full queue with
``x-overflow: reject-publish``) or cannot route is not sent: it stays in the outbox.

A blocked broker (a memory or disk alarm: RabbitMQ stops reading what a publishing
connection sends and tells it ``connection.blocked``) is ``AmqpSender.blocked``. While it
is, ``send`` publishes nothing and fails at once (``BrokerBlockedError``: the rows stay in
the outbox for the relay); a send already in flight when the block came waits for its
confirms, at most ``confirm_timeout``. The broker tells only a connection that publishes,
so the sender learns of an alarm with its first publish under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from celery import Celery
from kombu.serialization import dumps
from starlette.concurrency import run_in_threadpool

from aura import tracing
from aura.contract import PLATFORM_QUEUES
from aura.db import Staged
from aura.errors import ConfigurationError, ServiceUnavailableError
from aura.messaging.delivery import TENANT_HEADER
from aura.messaging.topology import WORK_EXCHANGE, broker_nodes, work_queues

if TYPE_CHECKING:
    import aio_pika

__all__ = [
    "AmqpSender",
    "BrokerBlockedError",
    "CelerySender",
    "Sender",
    "broker_urls",
    "is_blocked",
    "sender_for",
]

_CONFIRM_TIMEOUT = 30.0
# A node that does not answer (a partition, a host gone) costs this much before the next
# one is tried; a node that refuses (killed, restarting) costs nothing.
_CONNECT_TIMEOUT = 5.0


class Sender(Protocol):
    """Publishes messages; returns the ids the broker confirmed and the first failure."""

    async def send(
        self, messages: Sequence[Staged], *, deadline: float | None = None
    ) -> tuple[list[str], BaseException | None]: ...

    async def close(self) -> None: ...


class BrokerBlockedError(ServiceUnavailableError):
    """The broker blocks this connection's publishing (a resource alarm): nothing was sent."""


def is_blocked(sender: object) -> bool:
    """Whether ``sender`` says the broker blocks its publishing; a sender that cannot tell
    (``CelerySender``, a test double) never is."""
    return bool(getattr(sender, "blocked", False))


def sender_for(publisher: Any) -> Sender:
    """``publisher`` if it is a sender, else Celery's ``send_task`` on it (a Celery app or
    anything with its ``send_task``). ``AmqpSender`` is chosen explicitly by whoever
    owns its connection (``aura gateway``), since it must be closed."""
    if hasattr(publisher, "send") and not isinstance(publisher, Celery):
        return publisher  # type: ignore[no-any-return]
    return CelerySender(publisher)


class CelerySender:
    """``send_task`` in a worker thread, in order, until done, a failure or ``deadline``
    (by ``clock``; at least one message is tried)."""

    def __init__(self, publisher: Any, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.publisher = publisher
        self.clock = clock
        self._declared: set[str] = set()

    async def send(
        self, messages: Sequence[Staged], *, deadline: float | None = None
    ) -> tuple[list[str], BaseException | None]:
        return await run_in_threadpool(self._send, messages, deadline)

    def _send(
        self, messages: Sequence[Staged], deadline: float | None
    ) -> tuple[list[str], BaseException | None]:
        sent: list[str] = []
        try:
            for message in messages:
                if sent and deadline is not None and self.clock() >= deadline:
                    break  # the caller renews its claim before going on
                if tracing.enabled():
                    with _publish_span(message) as carried:
                        self._send_one(message, carried)
                else:
                    self._send_one(message, {})
                sent.append(message.message_id)
        except Exception as exc:  # the broker's many failure types: all mean "not now"
            return sent, exc
        return sent, None

    def _send_one(self, message: Staged, carried: dict[str, str]) -> None:
        self.publisher.send_task(
            message.task,
            args=message.args,
            kwargs=message.kwargs,
            task_id=message.message_id,
            queue=message.queue,
            headers={TENANT_HEADER: str(message.tenant_id), **carried},
        )

    async def depth(self, queue: str) -> int | None:
        """Messages ready on ``queue`` (a passive declare); None if this publisher is not
        a Celery app (a test double: it cannot tell)."""
        if not isinstance(self.publisher, Celery):
            return None
        return await run_in_threadpool(self._depth, queue)

    def _depth(self, queue: str) -> int:
        with self.publisher.connection_for_read() as connection:
            channel = connection.default_channel
            known = self.publisher.amqp.queues.get(queue)
            if known is not None and queue not in self._declared:  # as Celery declares it
                known(channel).declare()  # (a passive look at a queue not made yet fails)
                self._declared.add(queue)
            return int(channel.queue_declare(queue, passive=True).message_count)

    async def close(self) -> None:
        return None


class AmqpSender:
    """Celery messages over aio-pika, each batch published at once and its confirms
    awaited together. Connects on first use and again after a failure.

    The broker URL may list nodes (kombu's failover form, ``amqp://n1//;amqp://n2//``):
    a connect tries each node in turn, from the one after the node that last failed,
    each bounded by ``connect_timeout``; a publish that finds its connection broken
    moves on to the next node at the next send. ``problem`` is the last attempt's
    failure (None once a connect or a whole batch succeeds): what ``/readyz`` reports."""

    def __init__(
        self,
        app: Celery,
        *,
        confirm_timeout: float = _CONFIRM_TIMEOUT,
        connect_timeout: float = _CONNECT_TIMEOUT,
    ) -> None:
        self.app = app
        self.urls = broker_urls(app.conf.broker_url)
        self.confirm_timeout = confirm_timeout
        self.connect_timeout = min(connect_timeout, confirm_timeout)
        self.problem: str | None = None
        self._next = 0  # the node the next connect tries first
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._lock = asyncio.Lock()

    @property
    def url(self) -> str:
        """The node the sender uses, or tries first."""
        return self.urls[self._next]

    @property
    def blocked(self) -> bool:
        """The broker has blocked this sender's connection (``connection.blocked``, until
        ``connection.unblocked``): publishing waits until a resource alarm clears."""
        return _connection_blocked(self._connection)

    async def _ready(self) -> aio_pika.abc.AbstractExchange:
        async with self._lock:  # one connect at a time; no publish is awaited under it
            if self._exchange is not None and self._channel and not self._channel.is_closed:
                return self._exchange
            await self._drop()
            failure: BaseException = ConnectionError("no broker node")
            for attempt in range(len(self.urls)):
                index = (self._next + attempt) % len(self.urls)
                try:
                    exchange = await self._open(self.urls[index])
                except Exception as exc:  # that node cannot take it: the next one may
                    failure = exc
                    continue
                self._next, self.problem = index, None
                return exchange
            self._next = (self._next + 1) % len(self.urls)
            self.problem = _describe(failure, len(self.urls))
            raise failure

    async def _open(self, url: str) -> aio_pika.abc.AbstractExchange:
        """Connect to one node, declare the topology, keep the connection."""
        import aio_pika
        from aio_pika.connection import make_url

        # Not aio_pika.connect: a connection that fails to open is left for the garbage
        # collector, whose __del__ schedules a close() no one awaits.
        connection = aio_pika.Connection(make_url(url))
        try:
            await connection.connect(timeout=self.connect_timeout)
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            exchange = await channel.declare_exchange(
                WORK_EXCHANGE.name, aio_pika.ExchangeType.TOPIC, durable=True
            )
            for queue in work_queues(PLATFORM_QUEUES):
                declared = await channel.declare_queue(
                    queue.name, durable=True, arguments=getattr(queue, "queue_arguments", None)
                )
                await declared.bind(exchange, routing_key=queue.routing_key)
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        self._connection, self._channel, self._exchange = connection, channel, exchange
        return exchange

    async def _drop(self) -> None:
        connection, self._connection, self._exchange = self._connection, None, None
        self._channel = None
        if connection is not None and not connection.is_closed:
            try:
                await connection.close()
            except Exception:  # already broken: nothing to give back
                return

    def _message(self, staged: Staged, carried: dict[str, str]) -> aio_pika.Message:
        import aio_pika

        headers, properties, body, _ = self.app.amqp.as_task_v2(
            staged.message_id,
            staged.task,
            args=staged.args,
            kwargs=staged.kwargs,
            ignore_result=None,  # as send_task leaves it: the task's own setting decides
        )
        content_type, encoding, data = dumps(body, serializer="json")
        return aio_pika.Message(
            body=data if isinstance(data, bytes) else data.encode(),
            headers={**headers, TENANT_HEADER: str(staged.tenant_id), **carried},
            content_type=content_type,
            content_encoding=encoding,
            correlation_id=properties["correlation_id"],
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            priority=0,
        )

    async def send(
        self, messages: Sequence[Staged], *, deadline: float | None = None
    ) -> tuple[list[str], BaseException | None]:
        if not messages:
            return [], None
        if self.blocked:  # what it sent would wait unread until the alarm clears
            return [], BrokerBlockedError("the broker blocks publishing (a resource alarm)")
        try:
            exchange = await self._ready()
        except Exception as exc:
            return [], exc
        publish = self._publish_traced if tracing.enabled() else self._publish
        results = await asyncio.gather(
            *(publish(exchange, m) for m in messages), return_exceptions=True
        )
        sent = [m.message_id for m, r in zip(messages, results, strict=True) if _confirmed(r)]
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is None and len(sent) < len(messages):
            failure = RuntimeError("the broker returned a message it could not route")
        if failure is None:
            self.problem = None
            return sent, None
        self.problem = _describe(failure, 1)
        if self._connection is None or self._connection.is_closed:
            self._next = (self._next + 1) % len(self.urls)  # that node went away
        await self._drop()  # a broken channel is not reused
        return sent, failure

    def _publish(
        self, exchange: aio_pika.abc.AbstractExchange, message: Staged
    ) -> Awaitable[object]:
        return exchange.publish(
            self._message(message, {}), routing_key=message.queue, timeout=self.confirm_timeout
        )

    async def _publish_traced(
        self, exchange: aio_pika.abc.AbstractExchange, message: Staged
    ) -> object:
        """``_publish`` in a publish span: it ends with the broker's confirm."""
        with _publish_span(message) as carried:
            return await exchange.publish(
                self._message(message, carried),
                routing_key=message.queue,
                timeout=self.confirm_timeout,
            )

    async def probe(self) -> None:
        """Raise unless the sender holds, or can open, a channel on a node of its list
        (``/readyz``: the publisher's own state, not another connection's)."""
        if self.blocked:
            raise BrokerBlockedError("the broker blocks publishing (a resource alarm)")
        await self._ready()

    async def depth(self, queue: str) -> int:
        """Messages ready on ``queue`` (a passive declare on the sender's channel; raises
        what the broker does)."""
        await self._ready()
        channel = self._channel
        assert channel is not None
        declared = await channel.declare_queue(queue, passive=True, timeout=self.confirm_timeout)
        count = declared.declaration_result.message_count
        return int(count or 0)

    async def close(self) -> None:
        async with self._lock:
            await self._drop()


def _publish_span(message: Staged) -> contextlib.AbstractContextManager[dict[str, str]]:
    """The message's publish span (a child of the request that staged it) and the
    headers that carry it to the worker (``aura.tracing``)."""
    return tracing.publish_span(
        message.task, message.message_id, message.queue, message.traceparent, message.tenant_id
    )


def _connection_blocked(connection: aio_pika.abc.AbstractConnection | None) -> bool:
    """Whether the broker told ``connection`` it is blocked and not yet that it is not.

    aio-pika 10.2 and aiormq 7.2 have no property or callback for it: aiormq handles the
    ``connection.blocked`` and ``connection.unblocked`` frames itself and keeps the state
    only in a private event, ``aiormq.connection.Connection.__connection_unblocked``
    (cleared on Blocked, set on Unblocked and when the connection's reader starts), whose
    one public use is ``await Connection.ready()``. It is read here, and only here; an
    aiormq without it reads as never blocked (``tests/gateway/test_broker_blocked.py`` pins it)."""
    transport = None if connection is None or connection.is_closed else connection.transport
    if transport is None or not transport.connection.is_opened:
        return False
    unblocked = getattr(transport.connection, "_Connection__connection_unblocked", None)
    return isinstance(unblocked, asyncio.Event) and not unblocked.is_set()


def _confirmed(result: object) -> bool:
    import aiormq.abc

    return not isinstance(result, BaseException | aiormq.abc.DeliveredMessage)


def broker_urls(configured: object) -> list[str]:
    """A kombu broker URL (one, a ``;``-separated failover list, or a list of URLs) as
    the aio-pika URLs of its nodes, in order (``pyamqp://`` is plain AMQP; kombu's
    default vhost ``/`` is the path ``//``). Raises ConfigurationError on an empty one."""
    urls = broker_nodes(configured)
    if not urls:
        raise ConfigurationError("the broker URL names no node")
    return [
        "amqp://" + url.removeprefix("pyamqp://") if url.startswith("pyamqp://") else url
        for url in urls
    ]


def _describe(failure: BaseException, nodes: int) -> str:
    """The failure for /readyz: its type and, for a node list, how many were tried."""
    tried = f" (all {nodes} broker nodes)" if nodes > 1 else ""
    return f"unavailable: {type(failure).__name__}{tried}"
