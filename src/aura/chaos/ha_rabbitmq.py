"""rabbitmq-node-kill: a three-node RabbitMQ cluster of the run's own, and the node that
leads the work queues SIGKILLed mid-run, then started again ``down_s`` later.

Every component is given the cluster's node list (``own_broker="cluster"``: kombu's
``;``-separated form): the worker (kombu fails over; Aura's consumer sets up delayed
delivery on the node it reached, ``aura.messaging._delayed_delivery``), the gateway's own
publisher (``AmqpSender``: the next node of the list) and the relay. The worker and the
gateway both start on the first node of the list, where the work queues were declared
and so have their leaders: the kill takes their connections and the queues' leaders at
once, the worst case. The quorum queues keep a majority (two of three) and elect new
leaders among them.

What it proves, beyond the accounting's invariants: nothing is dead-lettered by the
broker (a message whose ack was lost with the node is redelivered and met by the inbox);
the gateway publishes again within ``publish_bound_s`` of the kill (its outbox does not
wait for the node's return); the worker is back to 90 % of its rate before the kill
within ``recovery_bound_s`` (``aura.chaos.throughput``); the worker never exits.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sqlalchemy import func, select

from aura.chaos.accounting import Accounting
from aura.chaos.broker_cluster import PrivateRabbitMQCluster
from aura.chaos.expectations import all_committed
from aura.chaos.run import ChaosRun
from aura.chaos.shared_state import broker_dead_lettered
from aura.chaos.throughput import around, database_clock, enriched_stamps
from aura.contract import BULK_QUEUE
from aura.db import Database, OutboxMessage
from aura.llm import Faults

__all__ = ["RabbitMQNodeKill"]


class RabbitMQNodeKill(ChaosRun):
    name = "rabbitmq-node-kill"
    summary = "a node of the run's own 3-node RabbitMQ cluster killed (the queues' leader)"
    expected_fates = (
        "all committed once, none broker-dead-lettered; the gateway publishes again within "
        "10 s of the kill; throughput back to 90 % within 10 s; the worker never exits"
    )
    default_products = 3000
    own_broker = "cluster"
    amqp_gateway = True
    worker_slots = 40
    faults = Faults(latency=0.2)
    baseline_s = 8.0
    down_s = 15.0
    after_s = 12.0  # sampled after the restart too: the recovery may come late
    publish_bound_s = 10.0
    recovery_bound_s = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.killed_at: float | None = None  # the database's clock (the stamps')
        self.down_for: float | None = None  # from the kill to the node's return
        self.outbox: list[tuple[float, int]] = []  # (time, the tenant's outbox rows)

    @property
    def cluster(self) -> PrivateRabbitMQCluster:
        cluster = self.stack.rabbitmq
        assert isinstance(cluster, PrivateRabbitMQCluster), "it runs on its own cluster"
        return cluster

    async def _outbox_rows(self, database: Database) -> int:
        """The tenant's outbox rows: held for the fair dispatcher, or being published."""
        async with database.session() as session:
            found = await session.scalar(
                select(func.count())
                .select_from(OutboxMessage)
                .where(OutboxMessage.tenant_id == self.tenant_id)
            )
        return int(found or 0)

    async def fault(self) -> None:
        database = Database.from_settings(self.settings)
        try:
            await asyncio.sleep(self.baseline_s)  # the rate before the kill
            leader = await asyncio.to_thread(self.cluster.leader_of, BULK_QUEUE, self.stack.vhost)
            self.details["killed_node"] = leader
            self.killed_at = await database_clock(database)
            await asyncio.to_thread(self.cluster.kill, leader)
            killed = time.monotonic()
            while time.monotonic() < killed + self.down_s:
                self.outbox.append((time.monotonic(), await self._outbox_rows(database)))
                await asyncio.sleep(0.5)
            started = time.monotonic()
            await asyncio.to_thread(self.cluster.restart, leader)
            self.down_for = time.monotonic() - killed
            self.details["node_restart_s"] = round(time.monotonic() - started, 2)
            await asyncio.sleep(self.after_s)
        finally:
            await database.dispose()

    async def before_count(self, database: Database) -> None:
        letters = await asyncio.to_thread(self.read_letters)
        self.details["broker_dead_lettered"] = broker_dead_lettered(letters)
        if self.killed_at is not None and self.tenant_id is not None:
            stamps = await enriched_stamps(database, self.tenant_id)
            ends = None if self.down_for is None else self.killed_at + self.down_for
            self.details["throughput"] = around(
                stamps, self.killed_at, ends, baseline_s=self.baseline_s
            )
        self.details["publishing_stalled_s"] = self._longest_stall()

    def _longest_stall(self) -> float | None:
        """The longest time, from the kill to the node's return, that the outbox held
        rows and none of them left it (the gateway published nothing); None: no samples.
        Before the fix the gateway given the node list published nothing at all."""
        if len(self.outbox) < 2:
            return None
        longest, since = 0.0, self.outbox[0][0]
        previous = self.outbox[0][1]
        for at, rows in self.outbox[1:]:
            if rows < previous or rows == 0:
                since = at
            longest = max(longest, at - since)
            previous = rows
        return round(longest, 2)

    def expect(self, accounting: Accounting, metrics: dict[str, int]) -> list[str]:
        failures = all_committed(accounting, self.records)
        self.details["duplicate_deliveries"] = metrics["duplicate_deliveries"]
        if self.details.get("broker_dead_lettered"):
            failures.append(f"{self.details['broker_dead_lettered']} broker-dead-lettered")
        stalled = self.details.get("publishing_stalled_s")
        if stalled is None or stalled > self.publish_bound_s:
            failures.append(f"the gateway published nothing for {stalled} s after the kill")
        recovered = self.details.get("throughput", {}).get("recovered_after_s")
        if recovered is None or recovered > self.recovery_bound_s:
            failures.append(f"throughput back to 90 % {recovered} s after the kill")
        if self.worker_restarts or any(self.details.get("worker_exit_codes", [])):
            failures.append(f"the worker exited: {self.details.get('worker_exit_codes')}")
        return failures
