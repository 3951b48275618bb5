"""A blocked broker (a memory alarm) on a RabbitMQ node of the test's own: the gateway sees
it, refuses new writes with 503 + Retry-After within its admission wait, answers what it
already staged without waiting out the confirm timeout, says so on ``/readyz``, and
publishes everything it accepted exactly once when the alarm clears.

The node is ``aura.chaos.broker_node.PrivateRabbitMQ`` (started once for the module, about
4 s); the machine's RabbitMQ is never blocked. Times are asserted only as generous bounds
(the issue saw answers after 33 s).
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
import uuid
from collections.abc import Iterator, Sequence

import aio_pika
import httpx
import pytest

from aura.chaos.broker_node import PrivateRabbitMQ
from aura.config import Settings
from aura.contract import BULK_QUEUE, ENRICH_TASK, REALTIME_QUEUE
from aura.db import Claim, Database, Staged, stage_messages
from aura.gateway import create_tenant_with_key
from aura.gateway.outbox import OutboxPublisher, relay_once, staging_lease
from aura.gateway.senders import AmqpSender, BrokerBlockedError
from aura.worker.celery_app import make_celery_app
from tests.helpers import outbox_rows, running_gateway, wait_until

pytestmark = pytest.mark.timeout(180)
ANSWER_BOUND = 10.0  # seconds: generous; a write under the alarm used to take 30+


@pytest.fixture(scope="module")
def gateway(
    rabbit: PrivateRabbitMQ, pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    env = {
        "DATABASE_URL": pg_url,
        "CELERY_BROKER_URL": rabbit.url,
        "REDIS_URL": redis_url,
        "OUTBOX_RELAY_INTERVAL": "0.5",
        "OUTBOX_RELAY_MIN_AGE": "1",
        "GATEWAY_MAX_WAIT": "0.5",
        "LOG_LEVEL": "INFO",
        "AURA_ENV_FILE": "",
    }
    with running_gateway(env, tmp_path_factory.mktemp("blocked") / "gateway.log") as (port, _):
        yield f"http://127.0.0.1:{port}"


def enrichment(name: str) -> Staged:
    return Staged(f"blocked-{name}-{uuid.uuid4().hex[:8]}", uuid.uuid4(), ENRICH_TASK,
                  REALTIME_QUEUE, [str(uuid.uuid4()), str(uuid.uuid4())])  # fmt: skip


async def test_the_sender_sees_the_block_and_publishes_nothing_into_it(
    rabbit: PrivateRabbitMQ,
) -> None:
    sender = AmqpSender(make_celery_app(Settings(celery_broker_url=rabbit.url)))
    try:
        before = enrichment("before")
        assert await sender.send([before]) == ([before.message_id], None)
        assert not sender.blocked
        rabbit.block_publishers()
        try:
            # The broker tells a connection only once it publishes under the alarm.
            in_flight = enrichment("in-flight")
            sending = asyncio.create_task(sender.send([in_flight]))

            async def blocked() -> bool:
                return sender.blocked

            await wait_until(blocked, within=ANSWER_BOUND)
            started = time.monotonic()
            sent, failure = await sender.send([enrichment("refused")])
            assert sent == []
            assert isinstance(failure, BrokerBlockedError)
            assert time.monotonic() - started < 1.0  # at once, not the 30 s confirm timeout
            assert not sending.done()  # its confirm waits for the alarm to clear
        finally:
            rabbit.unblock_publishers()
        assert await asyncio.wait_for(sending, 30) == ([in_flight.message_id], None)

        async def unblocked() -> bool:
            return not sender.blocked

        await wait_until(unblocked, within=ANSWER_BOUND)
    finally:
        await sender.close()


async def new_tenant(database: Database) -> tuple[uuid.UUID, str]:
    async with database.session() as session:
        tenant, key = await create_tenant_with_key(session, f"blocked-{uuid.uuid4().hex[:8]}")
        await session.commit()
    return tenant.id, key


async def staged(database: Database, tenant: uuid.UUID, count: int) -> tuple[list[Staged], Claim]:
    """``count`` messages committed in the outbox, held as a request holds what it stages."""
    messages = [
        Staged(f"blocked-{uuid.uuid4().hex}", tenant, ENRICH_TASK, REALTIME_QUEUE, [str(tenant)])
        for _ in range(count)
    ]
    claim = Claim.new(staging_lease(10))
    async with database.session() as session:
        await stage_messages(session, messages, claim)
        await session.commit()
    return messages, claim


async def test_what_is_staged_under_the_alarm_is_answered_at_once_and_relayed_after(
    rabbit: PrivateRabbitMQ, pg_database: Database
) -> None:
    tenant, _ = await new_tenant(pg_database)
    sender = AmqpSender(make_celery_app(Settings(celery_broker_url=rabbit.url)))
    publisher = OutboxPublisher(pg_database, sender, lease=10)
    try:
        rabbit.block_publishers()
        try:
            in_flight, claim = await staged(pg_database, tenant, 2)
            started = time.monotonic()  # its publish tells the sender it is blocked
            await publisher.publish(in_flight, claim, origin="test")
            assert time.monotonic() - started < ANSWER_BOUND
            assert sender.blocked
            refused, claim = await staged(pg_database, tenant, 3)
            started = time.monotonic()  # its batch fails at once: its rows are the relay's
            await publisher.publish(refused, claim, origin="test")
            assert time.monotonic() - started < ANSWER_BOUND
            assert await relay_once(pg_database, sender, min_age=0) == 0  # nothing goes out
            assert await outbox_rows(pg_database, tenant) == 5  # and nothing is lost
        finally:
            rabbit.unblock_publishers()

        async def all_published() -> bool:
            await relay_once(pg_database, sender, min_age=0)
            return await outbox_rows(pg_database, tenant) == 0

        await wait_until(all_published, within=30, interval=0.2)
    finally:
        await publisher.aclose()
    on_queue = collections.Counter(
        m.headers.get("id") for m in await drain(rabbit.url, REALTIME_QUEUE)
    )
    expected = [m.message_id for m in (*in_flight, *refused)]
    assert {message_id: on_queue[message_id] for message_id in expected} == dict.fromkeys(
        expected, 1
    )


class StallingSender:
    """A sender whose confirms never come until the test says; ``blocked`` as told."""

    def __init__(self) -> None:
        self.blocked = False
        self.sending = asyncio.Event()
        self.give_up = asyncio.Event()

    async def send(
        self, messages: Sequence[Staged], *, deadline: float | None = None
    ) -> tuple[list[str], BaseException | None]:
        self.sending.set()
        await self.give_up.wait()
        return [], RuntimeError("no confirm")

    async def close(self) -> None:
        return None


async def test_a_request_waits_for_its_confirms_a_bounded_time(
    sqlite_database: Database,
) -> None:
    stalled, blocking = StallingSender(), StallingSender()
    bounded = OutboxPublisher(sqlite_database, stalled, lease=10, max_answer_wait=0.2)
    patient = OutboxPublisher(sqlite_database, blocking, lease=10, max_answer_wait=60)
    try:
        started = time.monotonic()
        await bounded.publish([enrichment("bounded")], Claim.new(60), origin="test")
        assert 0.2 <= time.monotonic() - started < ANSWER_BOUND
        assert bounded.backlog == 1  # its batch goes on (the rows stay in the outbox)
        waiting = asyncio.create_task(
            patient.publish([enrichment("blocked")], Claim.new(60), origin="test")
        )
        await asyncio.wait_for(blocking.sending.wait(), ANSWER_BOUND)
        assert not waiting.done()
        blocking.blocked = True  # the broker blocks the send in flight: answered at once
        await asyncio.wait_for(waiting, ANSWER_BOUND)
        assert patient.backlog == 1
    finally:
        stalled.give_up.set()
        blocking.give_up.set()
        await bounded.aclose()
        await patient.aclose()
    assert bounded.backlog == patient.backlog == 0


def product() -> bytes:
    variant = {"sku": f"B-{uuid.uuid4().hex[:10]}", "price": "9.90", "currency": "EUR"}
    return json.dumps({"title": "blocked", "brand": "b", "variants": [variant]}).encode()


async def post(client: httpx.AsyncClient, path: str, body: bytes) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await client.post(path, content=body)
    return response, time.monotonic() - started


async def drain(url: str, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message on ``queue`` of the private node, taken off it (bounded)."""
    taken: list[aio_pika.abc.AbstractIncomingMessage] = []
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        while len(taken) < 10_000:
            message = await declared.get(no_ack=True, fail=False)
            if message is None:
                break
            taken.append(message)
    finally:
        await connection.close()
    return taken


async def test_a_blocked_broker_refuses_new_writes_and_loses_none_it_accepted(
    gateway: str, rabbit: PrivateRabbitMQ, pg_database: Database
) -> None:
    tenant, key = await new_tenant(pg_database)
    products, imports = f"/v1/tenants/{tenant}/products", f"/v1/tenants/{tenant}/imports"
    accepted: list[str] = []  # the message ids of the products answered 201
    headers = {"x-api-key": key, "content-type": "application/json"}
    async with httpx.AsyncClient(base_url=gateway, headers=headers, timeout=60) as client:
        response, _ = await post(client, products, product())
        assert response.status_code == 201, response.text
        accepted.append(f"enrich-{response.json()['id']}")
        rabbit.block_publishers()
        try:
            # The gateway learns of the alarm with its first publish under it: the writes
            # that passed admission before are committed and answered at once (published
            # after the alarm, by their batch or the relay); the next ones are refused.
            burst = await asyncio.gather(*(post(client, products, product()) for _ in range(8)))
            for response, took in burst:
                assert took < ANSWER_BOUND, (response.status_code, took)
                if response.status_code == 201:
                    accepted.append(f"enrich-{response.json()['id']}")
            for _ in range(20):
                response, took = await post(client, products, product())
                assert took < ANSWER_BOUND, (response.status_code, took)
                if response.status_code != 201:
                    break
                accepted.append(f"enrich-{response.json()['id']}")
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "unavailable"
            refused, took = await post(client, imports, b'[{"sku": "x"}]')
            assert refused.status_code == 503, refused.text
            assert took < ANSWER_BOUND
            assert "retry-after" in refused.headers

            async def says_blocked() -> bool:
                ready = await client.get("/readyz")
                return ready.status_code == 503 and ready.json()["checks"].get(
                    "broker", ""
                ).startswith("blocked")

            await wait_until(says_blocked, within=ANSWER_BOUND, interval=0.2)
        finally:
            rabbit.unblock_publishers()

        async def takes_writes() -> bool:
            response, _ = await post(client, products, product())
            if response.status_code == 201:
                accepted.append(f"enrich-{response.json()['id']}")
            return response.status_code == 201

        await wait_until(takes_writes, within=30, interval=0.2)
        imported = await client.post(imports, content=b'[{"a": 1}, {"a": 2}, {"a": 3}]')
        assert imported.status_code == 202, imported.text
        import_id = imported.json()["import_id"]

        async def ready() -> bool:
            return (await client.get("/readyz")).status_code == 200

        await wait_until(ready, within=30, interval=0.2)

    async def outbox_empty() -> bool:
        return await outbox_rows(pg_database, tenant) == 0

    await wait_until(outbox_empty, within=60, interval=0.2)  # all published, confirmed
    on_queue = collections.Counter(
        m.headers.get("id") for m in await drain(rabbit.url, REALTIME_QUEUE)
    )
    assert len(accepted) >= 3  # before, under and after the alarm
    assert {message_id: on_queue[message_id] for message_id in accepted} == dict.fromkeys(
        accepted, 1
    )  # every one accepted, exactly once
    bulk = [json.loads(m.body) for m in await drain(rabbit.url, BULK_QUEUE)]
    records = [args for args, kwargs, _ in bulk if kwargs.get("import_id") == import_id]
    assert len(records) == 3
