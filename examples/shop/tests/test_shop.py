"""The shop's tasks under a real worker: described once, however often delivered; bad
input in the DLQ with its reason."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from typing import Any

from kombu import Connection

from aura.db import Database
from aura.messaging import DeadLetterQueue
from shop.models import Order
from shop.tasks import DESCRIBE_TASK, describe_order
from tests.conftest import wait_for


def _run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


async def _add_order(item: str) -> str:
    database = Database(os.environ["DATABASE_URL"])
    try:
        async with database.session() as session:
            order = Order(id=uuid.uuid4().hex, item=item)
            session.add(order)
            await session.commit()
            return order.id
    finally:
        await database.dispose()


async def _order(order_id: str) -> Order | None:
    database = Database(os.environ["DATABASE_URL"])
    try:
        async with database.session() as session:
            return await session.get(Order, order_id)
    finally:
        await database.dispose()


def test_an_order_is_described_by_the_llm(worker: Any) -> None:
    order_id = _run(_add_order("trail shoe"))
    describe_order.delay(json.dumps({"order_id": order_id, "item": "trail shoe"}))
    order = wait_for(lambda: (o := _run(_order(order_id))) and o.blurb and o, what="the blurb")
    assert order.blurb == "A fine pick: One sentence about: trail shoe"
    assert order.times_described == 1


def test_a_redelivered_message_is_described_once(worker: Any) -> None:
    order_id = _run(_add_order("rain jacket"))
    payload = json.dumps({"order_id": order_id, "item": "rain jacket"})
    message_id = str(uuid.uuid4())
    describe_order.apply_async((payload,), task_id=message_id)
    wait_for(lambda: (o := _run(_order(order_id))) and o.blurb, what="the first delivery")
    describe_order.apply_async((payload,), task_id=message_id)  # the same message again
    marker = _run(_add_order("marker"))  # the queue is FIFO: once this is done, so is the twin
    describe_order.delay(json.dumps({"order_id": marker, "item": "marker"}))
    wait_for(lambda: (o := _run(_order(marker))) and o.blurb, what="the marker")
    assert _run(_order(order_id)).times_described == 1


def test_a_poison_pill_goes_to_the_dlq_with_its_reason(worker: Any) -> None:
    message_id = str(uuid.uuid4())
    describe_order.apply_async(("{not json",), task_id=message_id)

    def letter() -> Any:
        with Connection(os.environ["CELERY_BROKER_URL"]) as connection:
            letters = DeadLetterQueue(connection).list(task=DESCRIBE_TASK, limit=1000)
        return next((x for x in letters if x.message_id == message_id), None)

    found = wait_for(letter, what="the dead letter")
    assert found.reason.value == "poison_pill"
    assert found.queue == "shop_orders"
