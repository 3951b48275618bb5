"""The suite talks to the real PostgreSQL, Redis and RabbitMQ, not to fakes."""

from __future__ import annotations

import socket
import uuid

import asyncpg
import kombu
import redis.asyncio as aioredis

from tests import services


async def test_postgresql_is_the_real_server(pg_url: str) -> None:
    dsn = pg_url.replace("postgresql+asyncpg", "postgresql")
    writer = await asyncpg.connect(dsn)
    reader = await asyncpg.connect(dsn)
    try:
        assert str(await writer.fetchval("select version()")).startswith("PostgreSQL")
        assert await writer.fetchval("select current_database()") == services.PG_TEST_DATABASE
        await writer.execute("create table probe (token text)")
        token = uuid.uuid4().hex
        await writer.execute("insert into probe values ($1)", token)
        # A second connection (a second backend process) sees the committed row.
        assert await reader.fetchval("select token from probe") == token
        assert await writer.fetchval("select pg_backend_pid()") != await reader.fetchval(
            "select pg_backend_pid()"
        )
    finally:
        await writer.execute("drop table if exists probe")
        await writer.close()
        await reader.close()


async def test_redis_is_the_real_server(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    try:
        info = await client.info("server")
        host, port = redis_url.split("://", 1)[1].rsplit("/", 1)[0].rsplit(":", 1)
        assert info["tcp_port"] == int(port)
        assert "redis_version" in info
        token = uuid.uuid4().hex
        await client.set("probe", token, ex=60)
        # Read it back over a raw socket speaking RESP: a separate client, the same server.
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            db = redis_url.rsplit("/", 1)[1]
            raw.sendall(f"SELECT {db}\r\nGET probe\r\n".encode())
            reply = b""
            while token.encode() not in reply and len(reply) < 200:
                chunk = raw.recv(200)
                if not chunk:
                    break
                reply += chunk
        assert token.encode() in reply
    finally:
        await client.aclose()


def test_rabbitmq_is_the_real_broker(amqp_url: str) -> None:
    queue_name = f"probe-{uuid.uuid4().hex[:8]}"
    with kombu.Connection(amqp_url, connect_timeout=5) as conn:
        conn.ensure_connection(max_retries=3)
        assert conn.connection.server_properties["product"] == "RabbitMQ"
        queue = kombu.Queue(queue_name, durable=False, auto_delete=False)
        with conn.Producer() as producer:
            producer.publish({"probe": True}, routing_key=queue_name, declare=[queue])
        # The broker's own tool sees the queue and its message in this run's vhost.
        listing = services.rabbitmqctl(
            "list_queues", "-p", services.AMQP_TEST_VHOST, "name", "messages", "--quiet"
        )
        assert any(line.split() == [queue_name, "1"] for line in listing.splitlines())
        queue(conn.channel()).delete()
