"""The gateway's own publisher (``AmqpSender``, aio-pika on the event loop): what it sends
is what Celery itself would send, and a broker it cannot reach is a failure it reports."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from celery import Celery
from kombu.connection import Connection

from aura.config import Settings
from aura.contract import BULK_QUEUE
from aura.db import Staged
from aura.worker.celery_app import make_celery_app


@pytest.fixture(scope="module")
def celery_publisher(amqp_url: str) -> Celery:
    return make_celery_app(Settings(celery_broker_url=amqp_url))


async def test_the_amqp_sender_publishes_what_celery_itself_would(
    amqp_url: str, celery_publisher: Celery
) -> None:
    """aio-pika's message and Celery's ``send_task`` for the same task: the headers,
    properties and body a worker reads are the same (``origin`` names the process)."""
    from kombu import Exchange, Queue

    from aura.gateway.senders import AmqpSender
    from aura.messaging.topology import WORK_EXCHANGE

    tap = Queue(
        f"tap-{uuid.uuid4().hex[:8]}",
        Exchange(WORK_EXCHANGE.name, type="topic", durable=True),
        routing_key=BULK_QUEUE,
        auto_delete=True,
    )
    args = ['{"title": "Tap", "variants": [{"sku": "T-1", "price": 1}]}', "tenant"]
    kwargs = {"import_id": "i-1"}
    with Connection(amqp_url) as connection:
        consumer_channel = connection.channel()
        tap(consumer_channel).declare()
        celery_id, aio_id, tenant = str(uuid.uuid4()), str(uuid.uuid4()), uuid.uuid4()
        celery_publisher.send_task(
            "aura.ingest_product",
            args=args,
            kwargs=kwargs,
            task_id=celery_id,
            queue=BULK_QUEUE,
            headers={"aura_tenant": str(tenant)},  # as the worker's enrichments carry theirs
        )
        sender = AmqpSender(celery_publisher)
        try:
            sent, failure = await sender.send(
                [Staged(aio_id, tenant, "aura.ingest_product", BULK_QUEUE, args, kwargs)]
            )
        finally:
            await sender.close()
        assert (sent, failure) == ([aio_id], None)
        got: dict[str, Any] = {}
        simple = connection.SimpleQueue(tap)
        for _ in range(2):
            message = simple.get(timeout=10)
            got[message.headers["id"]] = message
            message.ack()
        simple.close()
    ours, theirs = got[aio_id], got[celery_id]
    assert ours.decode() == theirs.decode() == [args, kwargs, ANY_EMBED]
    assert ours.content_type == theirs.content_type == "application/json"
    assert ours.content_encoding == theirs.content_encoding == "utf-8"
    assert ours.properties["correlation_id"] == aio_id
    assert ours.properties["delivery_mode"] == theirs.properties["delivery_mode"] == 2
    skip = {"id", "root_id", "origin", "argsrepr", "kwargsrepr"}
    assert {k: v for k, v in ours.headers.items() if k not in skip} == {
        k: v for k, v in theirs.headers.items() if k not in skip
    }
    assert ours.headers["aura_tenant"] == str(tenant)  # the pool's fair share goes by it
    assert ours.headers["root_id"] == aio_id


class _AnyEmbed:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, dict) and {"callbacks", "errbacks", "chain", "chord"} <= set(other)


ANY_EMBED = _AnyEmbed()


async def test_the_amqp_sender_reports_a_broker_it_cannot_reach(celery_publisher: Celery) -> None:
    from aura.gateway.senders import AmqpSender

    unreachable = make_celery_app(
        Settings(celery_broker_url="amqp://guest:guest@127.0.0.1:1/nowhere")
    )
    sender = AmqpSender(unreachable, confirm_timeout=2)
    message = Staged(str(uuid.uuid4()), uuid.uuid4(), "aura.ingest_product", BULK_QUEUE, [], {})
    sent, failure = await sender.send([message])
    await sender.close()
    assert sent == []
    assert isinstance(failure, OSError | ConnectionError)
