"""Round trips of ``RetryTracker.increment_and_check`` (Redis) and ``route_to_dlq`` (RabbitMQ).

    .venv/bin/python bench/round_trips.py [--calls N] [--letters M] [--rounds R]

Redis (db 13). The client's connections are a subclass of redis-py's asyncio
``Connection`` that counts ``send_packed_command`` (one write of one or more packed
commands, after which the caller waits for their replies: one round trip) and
``read_response`` (one reply parsed). Counting at the client was chosen over the
server's view: ``INFO commandstats`` counts commands, not how they were batched, and is
server-wide (other test suites share this Redis); ``MONITOR`` likewise shows commands, and
slows the server for everyone while it runs. ``increment_and_check`` (INCR and EXPIRE in
one MULTI/EXEC pipeline) is measured against a naive INCR, then EXPIRE (2 round trips);
a PING shows what one round trip costs through redis-py here (loopback).

RabbitMQ (its own vhost, made and removed here). py-amqp's ``send_method`` (methods the
client sends), ``Connection.on_inbound_method`` (methods the broker sends) and
``AbstractChannel.wait`` (the client blocked on an answer: a round trip) are counted, for
``route_to_dlq`` on the connection the worker uses (``app.connection_for_write()``,
``confirm_publish``), against the same dead letter body published with a confirm by kombu
directly (what ``route_to_dlq`` publishes with, minus the record, redaction and thread
hop), and published without a confirm on a plain connection. The unconfirmed time is the
client's; the broker is still writing when it returns, so the time until the queue holds
every message is shown as well. Calls run one after another; rounds alternate kinds and
the best round of each counts. Target (DESIGN.md): 1 Redis round trip per
``increment_and_check``.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import amqp
import redis.asyncio as aioredis
from amqp import spec
from amqp.abstract_channel import AbstractChannel
from kombu import Connection

from aura.config import Settings
from aura.contract import REALTIME_QUEUE
from aura.logs import configure_logging
from aura.messaging._retry import RetryTracker
from aura.messaging.dlq import DeadLetter, _publish_confirmed, route_to_dlq
from aura.messaging.topology import DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE
from aura.worker.celery_app import declare_topology, make_celery_app

VHOST = "aura_bench"
TTL = 3600


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


# -- Redis ---------------------------------------------------------------------------------


class CountingConnection(aioredis.Connection):
    """A redis-py asyncio connection that counts its writes and the replies it reads."""

    sends = 0
    replies = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sends += 1
        await super().send_packed_command(command, check_health)

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        CountingConnection.replies += 1
        return await super().read_response(*args, **kwargs)


async def naive_increment_and_check(client: aioredis.Redis, key: str, max_retries: int) -> bool:
    count = await client.incr(key)
    await client.expire(key, TTL)
    return int(count) > max_retries


async def ping(client: aioredis.Redis) -> bool:
    await client.ping()
    return False


async def redis_round(
    call: Callable[[str], Awaitable[bool]], calls: int
) -> tuple[float, float, float]:
    """(microseconds, round trips, replies) per call, over ``calls`` fresh message ids."""
    ids = [str(uuid.uuid4()) for _ in range(calls)]
    CountingConnection.sends = CountingConnection.replies = 0
    started = time.perf_counter()
    for message_id in ids:
        if await call(message_id):
            raise SystemExit("a first failure must not be past the budget")
    elapsed = time.perf_counter() - started
    sends, replies = CountingConnection.sends, CountingConnection.replies
    return elapsed / calls * 1e6, sends / calls, replies / calls


async def redis_part(redis_url: str, calls: int, rounds: int) -> dict[str, list[tuple]]:
    pool = aioredis.ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
    client = aioredis.Redis(connection_pool=pool)
    prefix = f"bench_round_trips:{uuid.uuid4().hex[:8]}:"
    tracker = RetryTracker(client, max_retries=3, ttl=TTL, prefix=prefix)
    kinds: dict[str, Callable[[str], Awaitable[bool]]] = {
        "RetryTracker.increment_and_check": tracker.increment_and_check,
        "naive INCR then EXPIRE": lambda m: naive_increment_and_check(client, prefix + m, 3),
        "reference: PING": lambda _: ping(client),
    }
    results: dict[str, list[tuple]] = {kind: [] for kind in kinds}
    try:
        await client.ping()  # connect (HELLO/CLIENT SETINFO) before anything is counted
        for call in kinds.values():
            await redis_round(call, 50)  # warm-up
        for _ in range(rounds):
            for kind, call in kinds.items():
                results[kind].append(await redis_round(call, calls))
    finally:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
        await client.aclose()
        await pool.disconnect()
    return results


# -- RabbitMQ ------------------------------------------------------------------------------

_NAMES = {
    sig: f"{cls.__name__.lower()}.{name}"
    for cls in (spec.Connection, spec.Channel, spec.Exchange, spec.Queue, spec.Basic, spec.Confirm)
    for name, sig in vars(cls).items()
    if isinstance(sig, tuple) and len(sig) == 2
}


class AmqpCounter:
    """Methods sent and received, and waits, across every py-amqp connection here."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()
        self.received: Counter[str] = Counter()
        self.waits = 0

    @contextmanager
    def installed(self) -> Iterator[AmqpCounter]:
        send_method, wait = AbstractChannel.send_method, AbstractChannel.wait
        on_inbound = amqp.Connection.on_inbound_method
        counter = self

        def counted_send(self: Any, sig: Any, *args: Any, **kwargs: Any) -> Any:
            counter.sent[_NAMES.get(tuple(sig), str(sig))] += 1
            return send_method(self, sig, *args, **kwargs)

        def counted_wait(self: Any, *args: Any, **kwargs: Any) -> Any:
            counter.waits += 1
            return wait(self, *args, **kwargs)

        def counted_inbound(self: Any, channel_id: int, sig: Any, *args: Any) -> Any:
            counter.received[_NAMES.get(tuple(sig), str(sig))] += 1
            return on_inbound(self, channel_id, sig, *args)

        AbstractChannel.send_method = counted_send  # type: ignore[method-assign]
        AbstractChannel.wait = counted_wait  # type: ignore[method-assign]
        amqp.Connection.on_inbound_method = counted_inbound  # type: ignore[method-assign]
        try:
            yield self
        finally:
            AbstractChannel.send_method = send_method  # type: ignore[method-assign]
            AbstractChannel.wait = wait  # type: ignore[method-assign]
            amqp.Connection.on_inbound_method = on_inbound  # type: ignore[method-assign]

    def reset(self) -> None:
        self.sent.clear()
        self.received.clear()
        self.waits = 0


def sample_letter() -> DeadLetter:
    now = datetime.now(UTC)
    return DeadLetter(
        message_id=str(uuid.uuid4()),
        reason="max_retries_exceeded",
        task="aura.enrich_product",
        queue=REALTIME_QUEUE,
        task_args=[str(uuid.uuid4()), str(uuid.uuid4())],
        error_type="LLMTimeoutError",
        error="the LLM did not answer within 10 s",
        retries=3,
        first_failure_at=now,
        last_failure_at=now,
        tenant_id=str(uuid.uuid4()),
    )


def queue_depth(connection: Connection) -> int:
    declared = connection.default_channel.queue_declare(DEAD_LETTER_QUEUE, passive=True)
    return int(declared.message_count)


class DlqKinds:
    """The three ways of putting one dead letter on the DLQ, one call each."""

    def __init__(self, confirmed: Connection, unconfirmed: Connection) -> None:
        self.confirmed, self.unconfirmed = confirmed, unconfirmed
        self.loop = asyncio.new_event_loop()
        self.letter = sample_letter()
        self.body = self.letter.model_dump(mode="json")

    def route_to_dlq(self) -> None:
        letter = self.letter
        self.loop.run_until_complete(
            route_to_dlq(
                letter.message_id,
                letter.reason,
                connection=self.confirmed,
                task=letter.task,
                queue=letter.queue,
                args=letter.task_args,
                error=TimeoutError(letter.error),
                retries=letter.retries,
                first_failure_at=letter.first_failure_at,
                tenant_id=letter.tenant_id,
            )
        )

    def kombu_confirmed(self) -> None:
        _publish_confirmed(self.confirmed, self.letter)

    def unconfirmed_publish(self) -> None:
        with self.unconfirmed.Producer() as producer:
            producer.publish(
                self.body,
                exchange=DEAD_LETTER_EXCHANGE,
                routing_key=DEAD_LETTER_QUEUE,
                serializer="json",
                delivery_mode="persistent",
                message_id=self.letter.id,
                headers={"x-aura-reason": self.letter.reason.value, "x-aura-task": "bench"},
            )


def dlq_round(kinds: DlqKinds, counter: AmqpCounter, kind: str, letters: int) -> dict[str, Any]:
    call = getattr(kinds, kind)
    before = queue_depth(kinds.confirmed)
    counter.reset()
    started = time.perf_counter()
    for _ in range(letters):
        call()
    client = time.perf_counter() - started
    sent, received, waits = Counter(counter.sent), Counter(counter.received), counter.waits
    while queue_depth(kinds.confirmed) < before + letters:  # until the broker holds them
        if time.perf_counter() - started > 120:
            raise SystemExit(f"{kind}: the DLQ did not receive {letters} messages")
        time.sleep(0.005)
    landed = time.perf_counter() - started
    return {
        "client_ms": client / letters * 1000,
        "landed_ms": landed / letters * 1000,
        "sent": sent,
        "received": received,
        "waits": waits,
    }


def amqp_part(letters: int, rounds: int) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    rabbitmqctl("add_vhost", VHOST)
    rabbitmqctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
    broker = f"amqp://guest:guest@127.0.0.1:5672/{VHOST}"
    app = make_celery_app(Settings(celery_broker_url=broker))
    results: dict[str, list[dict[str, Any]]] = {
        "route_to_dlq": [],
        "kombu_confirmed": [],
        "unconfirmed_publish": [],
    }
    try:
        declare_topology(app)
        confirmed = app.connection_for_write()  # what the worker's runtime uses
        unconfirmed = Connection(broker)
        kinds = DlqKinds(confirmed, unconfirmed)
        counter = AmqpCounter()
        with counter.installed():
            # The first dead letter on a fresh connection (its channel is already open):
            # confirm.select and the DLQ's declarations, which kombu then caches.
            first = dlq_round(kinds, counter, "route_to_dlq", 1)
            for kind in results:  # warm-up
                dlq_round(kinds, counter, kind, 5)
            for _ in range(rounds):
                for kind in results:
                    results[kind].append(dlq_round(kinds, counter, kind, letters))
        kinds.loop.close()
        confirmed.release()
        unconfirmed.release()
    finally:
        rabbitmqctl("delete_vhost", VHOST)
    return first, results


# -- report --------------------------------------------------------------------------------


def per_letter(counts: Counter[str], letters: int) -> str:
    shown = ", ".join(f"{name} {n / letters:g}" for name, n in sorted(counts.items()))
    return shown or "none"


def main(calls: int, letters: int, rounds: int, redis_url: str) -> None:
    configure_logging("ERROR")
    redis_results = asyncio.run(redis_part(redis_url, calls, rounds))
    first, amqp_results = amqp_part(letters, rounds)

    print(f"Redis: {calls:,} calls per round, best of {rounds} rounds, fresh message ids")
    best_redis = {kind: min(runs) for kind, runs in redis_results.items()}
    for kind, (micros, trips, replies) in best_redis.items():
        print(
            f"  {kind:<34} {micros:7.1f} us/call   round trips/call {trips:.2f}"
            f"   replies/call {replies:.2f}"
        )
    print(f"RabbitMQ: {letters:,} dead letters per round, one at a time, best of {rounds}")
    best_amqp = {
        kind: min(runs, key=lambda r: r["client_ms"]) for kind, runs in amqp_results.items()
    }
    for kind, best in best_amqp.items():
        publishes = best["sent"]["basic.Publish"] / letters
        confirms = best["received"]["basic.Ack"] / letters
        print(
            f"  {kind:<20} {best['client_ms']:6.3f} ms/letter (in the queue: "
            f"{best['landed_ms']:6.3f})   publishes {publishes:g}, confirms waited for "
            f"{confirms:g}, waits {best['waits'] / letters:g} per letter"
        )
        print(f"    {'sent':<9}{per_letter(best['sent'], letters)}")
        print(f"    {'received':<9}{per_letter(best['received'], letters)}")

    print("  the first route_to_dlq on a fresh connection (not in the figures above):")
    print(f"    {'sent':<9}{per_letter(first['sent'], 1)}")
    print(f"    {'received':<9}{per_letter(first['received'], 1)}")
    aura = best_redis["RetryTracker.increment_and_check"]
    naive = best_redis["naive INCR then EXPIRE"]
    route, direct = best_amqp["route_to_dlq"], best_amqp["kombu_confirmed"]
    plain = best_amqp["unconfirmed_publish"]
    ratios = {
        "Redis round trips, increment_and_check / naive": aura[1] / naive[1],
        "Redis time per call, increment_and_check / naive": aura[0] / naive[0],
        "route_to_dlq / unconfirmed publish, client time": route["client_ms"] / plain["client_ms"],
        "route_to_dlq / unconfirmed publish, in the queue": route["landed_ms"] / plain["landed_ms"],
        "route_to_dlq / kombu confirmed publish": route["client_ms"] / direct["client_ms"],
    }
    print("--- ratios")
    for name, value in ratios.items():
        print(f"{name + ':':<50} {value:.3f}")
    met = "MET" if aura[1] == 1.0 else "NOT MET"
    print(f"target 1 Redis round trip per increment_and_check: {aura[1]:.2f}, {met}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--letters", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    args = parser.parse_args()
    main(args.calls, args.letters, args.rounds, args.redis_url)
