"""A broker given as a list of nodes (kombu's failover form, ``amqp://n1//;amqp://n2//``):
the gateway's own publisher takes the list, moves to the next node when one dies (the
outbox empties within seconds, not at the node's return), and ``/readyz`` tells the
publisher's real state. The node that dies is a ``PrivateRabbitMQ`` of the test's own;
the machine's RabbitMQ (a vhost of the run's) is the survivor and is never stopped.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kombu.connection import Connection
from kombu.exceptions import OperationalError

from aura.chaos.broker_node import PrivateRabbitMQ
from aura.config import Settings
from aura.contract import PLATFORM_QUEUES, REALTIME_QUEUE
from aura.db import Database, Staged
from aura.errors import ConfigurationError
from aura.gateway import Gateway, create_tenant_with_key
from aura.gateway.senders import AmqpSender, broker_urls
from aura.messaging.topology import work_queues
from aura.worker.celery_app import make_celery_app
from tests.helpers import outbox_rows, running_gateway, wait_until

pytestmark = pytest.mark.timeout(120)
REFUSES = "amqp://guest:guest@127.0.0.1:1//"  # nothing listens on port 1


def test_a_node_list_is_read_as_kombu_writes_it() -> None:
    assert broker_urls("pyamqp://u:p@a:5672//; amqp://u:p@b:5673/v") == [
        "amqp://u:p@a:5672//",
        "amqp://u:p@b:5673/v",
    ]
    assert broker_urls(["amqp://a//", "amqp://b//"]) == ["amqp://a//", "amqp://b//"]
    with pytest.raises(ConfigurationError):
        broker_urls(" ; ")


@given(
    st.lists(
        st.tuples(st.from_regex(r"[a-z][a-z0-9.-]{0,20}", fullmatch=True), st.integers(1, 65535)),
        min_size=1,
        max_size=5,
    )
)
def test_every_node_of_a_list_is_kept_in_order(nodes: list[tuple[str, int]]) -> None:
    urls = [f"amqp://guest:guest@{host}:{port}/vh" for host, port in nodes]
    assert broker_urls(";".join(urls)) == urls


def enrichments(count: int) -> list[Staged]:
    return [
        Staged(
            f"failover-{uuid.uuid4().hex}",
            uuid.uuid4(),
            "aura.enrich_product",
            REALTIME_QUEUE,
            [str(uuid.uuid4()), str(uuid.uuid4())],
        )
        for _ in range(count)
    ]


def take(amqp_url: str, queue: str, ids: set[str]) -> set[str]:
    """Ack and return the messages of ``ids`` found on ``queue`` (the rest go back)."""
    found: set[str] = set()
    declared = {q.name: q for q in work_queues(PLATFORM_QUEUES)}
    with Connection(amqp_url) as connection:
        channel = connection.channel()
        bound = declared[queue](channel)
        bound.declare()
        while (message := bound.get(no_ack=False)) is not None:
            if message.headers.get("id") in ids:
                found.add(message.headers["id"])
                message.ack()
        channel.close()
    return found


async def test_the_sender_takes_the_next_node_when_one_refuses(
    amqp_url: str, pg_database: Database
) -> None:
    sender = AmqpSender(make_celery_app(Settings(celery_broker_url=f"{REFUSES};{amqp_url}")))
    messages = enrichments(20)
    try:
        sent, failure = await sender.send(messages)
        assert failure is None
        assert sender.url == amqp_url
        assert sender.problem is None
    finally:
        await sender.close()
    ids = {m.message_id for m in messages}
    assert set(sent) == ids
    assert take(amqp_url, REALTIME_QUEUE, ids) == ids  # each once, on the live node


async def test_readiness_says_so_when_no_node_takes_the_publisher(pg_database: Database) -> None:
    dead = make_celery_app(Settings(celery_broker_url=f"{REFUSES};{REFUSES.replace(':1/', ':2/')}"))
    sender = AmqpSender(dead, confirm_timeout=2)
    gateway = Gateway(pg_database, dead, {}, sender=sender)
    try:
        sent, failure = await sender.send(enrichments(1))
        assert sent == []
        assert isinstance(failure, OSError | ConnectionError)
        assert sender.problem == f"unavailable: {type(failure).__name__} (all 2 broker nodes)"
        checks = await gateway.readiness.checks()
        assert checks["database"] == "ok"
        assert checks["broker"].startswith("unavailable:"), checks
    finally:
        await sender.close()


@pytest.fixture
def doomed() -> Iterator[PrivateRabbitMQ]:
    """A node this test kills (function scope: never shared)."""
    node = PrivateRabbitMQ()
    node.start()
    try:
        yield node
    finally:
        node.stop()


async def test_the_gateway_keeps_publishing_through_a_node_loss(
    doomed: PrivateRabbitMQ,
    amqp_url: str,
    pg_url: str,
    pg_database: Database,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    env = {
        "DATABASE_URL": pg_url,
        "CELERY_BROKER_URL": f"{doomed.url};{amqp_url}",  # the doomed node first
        "REDIS_URL": redis_url,
        "OUTBOX_RELAY_INTERVAL": "0.5",
        "OUTBOX_RELAY_MIN_AGE": "1",
        "TENANT_SCHEDULING": "fifo",
        "AURA_ENV_FILE": "",
    }
    async with pg_database.session() as session:
        tenant, key = await create_tenant_with_key(session, f"failover-{uuid.uuid4().hex[:8]}")
        await session.commit()
    log = tmp_path_factory.mktemp("failover") / "gateway.log"
    with running_gateway(env, log) as (port, _):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:

            async def post(sku: str) -> str:
                body = {"title": sku, "variants": [{"sku": sku, "price": 1}]}
                made = await http.post(
                    f"/v1/tenants/{tenant.id}/products", json=body, headers={"X-API-Key": key}
                )
                assert made.status_code == 201, made.text
                return f"enrich-{made.json()['id']}"

            before = {await post(f"B-{i}") for i in range(3)}

            async def first_node_took_them() -> bool:
                return doomed.queue_depth(REALTIME_QUEUE) == len(before)

            await wait_until(first_node_took_them, within=10.0, interval=0.2)
            doomed.stop(remove=False)  # SIGKILL: the gateway's connection drops
            after = {await post(f"A-{i}") for i in range(10)}

            async def drained() -> bool:
                return await outbox_rows(pg_database, tenant.id) == 0

            await wait_until(drained, within=10.0)  # not at the node's return: it is gone

            async def ready() -> bool:
                answer = await http.get("/readyz")
                return answer.status_code == 200

            await wait_until(ready, within=10.0)
    assert take(amqp_url, REALTIME_QUEUE, after) == after  # each once, on the survivor


def test_the_cli_connects_to_the_first_node_that_answers(amqp_url: str) -> None:
    from aura.cli.failures import connect_broker

    connection = connect_broker(f"{REFUSES};{amqp_url}", timeout=2)
    try:
        assert connection.as_uri(include_password=True) == amqp_url
        assert len(connection.alt) == 2  # kombu keeps the list for its own failover
    finally:
        connection.release()
    with pytest.raises(OperationalError, match="Connection refused"):
        connect_broker(f"{REFUSES};{REFUSES.replace(':1/', ':2/')}", timeout=2)


async def test_readiness_finds_the_live_node_of_a_list(amqp_url: str) -> None:
    from aura.gateway.lifespan import gateway_from_settings
    from aura.gateway.readiness import default_checks

    two_dead = f"{REFUSES};{REFUSES.replace(':1/', ':2/')};{amqp_url}"
    await default_checks(Settings(celery_broker_url=two_dead))["broker"]()  # raises if down
    with pytest.raises(OperationalError):
        await default_checks(Settings(celery_broker_url=f"{REFUSES}"))["broker"]()
    # `aura gateway`'s own: the publisher's probe answers for the broker, no other connection
    gateway = gateway_from_settings(Settings(celery_broker_url=two_dead))
    try:
        assert "broker" not in gateway.ready_checks
        assert await gateway._publisher_probe() == "ok"
    finally:
        await gateway.outbox.sender.close()
        await gateway.database.dispose()


def test_a_node_list_is_validated_node_by_node_and_masked_whole() -> None:
    from aura.config import mask_url

    listed = Settings(celery_broker_url="pyamqp://u:pw1@a:5672//;amqp://u:pw2@b:5672//;")
    assert listed.celery_broker_url == "pyamqp://u:pw1@a:5672//;amqp://u:pw2@b:5672//"
    masked = mask_url(str(listed.celery_broker_url))
    assert "pw1" not in masked
    assert "pw2" not in masked
    assert masked == "pyamqp://u:***@a:5672//;amqp://u:***@b:5672//"
    with pytest.raises(ValueError, match="expected a URL with scheme"):
        Settings(celery_broker_url="amqp://u:p@a:5672//;http://b")
