"""The shop's tasks: an LLM writes a blurb for each order, stored exactly once."""

from __future__ import annotations

import functools
import json
import os

from celery import Task
from sqlalchemy.ext.asyncio import AsyncSession

from aura.db import Database, DatabaseInbox, claim_message, transactional
from aura.llm import ResilientLLMClient
from aura.messaging import delivery_fingerprint, resilient_task
from shop.celery_app import app
from shop.models import Order

DESCRIBE_TASK = "shop.describe_order"


@functools.cache
def _resources(pid: int) -> tuple[Database, ResilientLLMClient]:
    """This worker process's pool and LLM client (made on its event loop, then kept)."""
    return Database.from_settings(), ResilientLLMClient()


def database() -> Database:
    return _resources(os.getpid())[0]


@transactional  # one transaction: the inbox row and the effect commit together, or neither
async def save_blurb(
    session: AsyncSession, order_id: str, blurb: str, *, message_id: str, fingerprint: str
) -> bool:
    if not await claim_message(session, message_id, task=DESCRIBE_TASK, fingerprint=fingerprint):
        return False  # a redelivery: the blurb is already stored
    order = await session.get(Order, order_id)
    if order is None:
        raise LookupError(f"no order {order_id}")
    order.blurb = blurb
    order.times_described += 1
    return True


@resilient_task(
    app=app,
    name=DESCRIBE_TASK,
    queue="shop_orders",
    inbox=DatabaseInbox(database),
    max_retries=2,
    backoff_base=1.0,
    backoff_max=2.0,
)
async def describe_order(self: Task, payload: str) -> None:
    """``payload`` is JSON ``{"order_id": ..., "item": ...}``; bad JSON is a poison pill
    (to the DLQ at once, no retry spent)."""
    order = json.loads(payload)
    db, llm = _resources(os.getpid())
    answer = await llm.complete(
        [{"role": "user", "content": f"One sentence about: {order['item']}"}], max_tokens=60
    )
    async with db.session() as session:
        await save_blurb(
            session,
            order["order_id"],
            answer.text,
            message_id=self.request.id,
            fingerprint=delivery_fingerprint(self),
        )
