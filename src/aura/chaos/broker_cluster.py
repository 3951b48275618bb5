"""A three-node RabbitMQ cluster of one's own, for the scenario that kills a broker node.

``PrivateRabbitMQCluster`` starts three ``PrivateRabbitMQ`` nodes (the machine's
``rabbitmq-server``) in one directory, then joins the second and the third to the first
(``rabbitmqctl join_cluster``), as an operator does by hand. Quorum queues declared on it
get a member on every node, so losing any one node keeps a majority: the queue elects a
new leader among the two left and goes on.

    url          every node's AMQP URL, ``;``-separated (kombu's failover list; Aura's
                 gateway publisher and every other component take the same list)
    kill(node)   SIGKILL one node (no goodbye: its clients see a dropped connection);
                 its data stay, so ``restart(node)`` brings it back into the cluster
    leader_of    the node leading a quorum queue (``rabbitmqctl list_queues leader``)
    ctl          ``rabbitmqctl`` on a node that runs (vhosts and users are cluster-wide)

Measured on this 2-core machine: the cluster forms in 12-20 s (three nodes starting at
once, then two joins), about 130 MiB per node.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from types import TracebackType

from aura.chaos.broker_node import PrivateRabbitMQ
from aura.errors import ConfigurationError

__all__ = ["PrivateRabbitMQCluster"]


class PrivateRabbitMQCluster:
    """Three RabbitMQ nodes of the caller's own, clustered; a context manager."""

    size = 3

    def __init__(self, *, start_timeout: float = 120.0) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="aura-rabbitmq-cluster-"))
        self.directory.chmod(0o755)  # the nodes run as ``rabbitmq``: they pass through it
        self.start_timeout = start_timeout
        first = PrivateRabbitMQ(self.directory / "n1", start_timeout=start_timeout)
        self.nodes = [first] + [
            PrivateRabbitMQ(
                self.directory / f"n{index}",
                start_timeout=start_timeout,
                name=f"aura-{first.token}-{index}",
            )
            for index in range(2, self.size + 1)
        ]
        self.killed: set[str] = set()
        self.startup_seconds: float | None = None

    @property
    def url(self) -> str:
        """Every node's URL, ``;``-separated: the default vhost."""
        return ";".join(node.url for node in self.nodes)

    @property
    def node(self) -> str:
        """A node that runs (for ``rabbitmqctl -n``)."""
        return self.running()[0].node

    def running(self) -> list[PrivateRabbitMQ]:
        alive = [node for node in self.nodes if node.node not in self.killed]
        if not alive:
            raise ConfigurationError("no node of the private cluster runs")
        return alive

    def by_name(self, name: str) -> PrivateRabbitMQ:
        for node in self.nodes:
            if node.node == name:
                return node
        raise ConfigurationError(f"{name} is not a node of this cluster")

    def start(self) -> None:
        """Start the three nodes at once, then join the others to the first (bounded by
        ``start_timeout``); stop them all and raise ConfigurationError on failure."""
        started = time.monotonic()
        deadline = started + self.start_timeout
        try:
            for node in self.nodes:
                node.launch()
            for node in self.nodes:
                node.wait_started(deadline)
            for node in self.nodes[1:]:
                node.ctl("stop_app")
                node.ctl("join_cluster", self.nodes[0].node)
                node.ctl("start_app")
            self._await_members(deadline)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started

    def _await_members(self, deadline: float) -> None:
        want = {node.node for node in self.nodes}
        while True:
            status = json.loads(self.nodes[0].ctl("cluster_status", "--formatter", "json"))
            if want <= set(status.get("running_nodes", ())):
                return
            if time.monotonic() > deadline:
                raise ConfigurationError("the private RabbitMQ cluster did not form in time")
            time.sleep(0.2)

    def ctl(self, *arguments: str, timeout: float = 60) -> str:
        return self.running()[0].ctl(*arguments, timeout=timeout)

    def leader_of(self, queue: str, vhost: str) -> str:
        """The node leading quorum queue ``queue`` in ``vhost``."""
        listed = self.ctl("list_queues", "-p", vhost, "--no-table-headers", "name", "leader")
        for line in listed.splitlines():
            name, _, leader = line.partition("\t")
            if name == queue:
                return leader.strip()
        raise ConfigurationError(f"no queue {queue!r} in vhost {vhost!r}")

    def block_publishers(self) -> None:
        """A memory alarm on every node: the cluster blocks every publishing connection."""
        for node in self.running():
            node.block_publishers()

    def unblock_publishers(self) -> None:
        for node in self.running():
            node.unblock_publishers()

    def kill(self, name: str) -> None:
        """SIGKILL node ``name`` (its data stay, for ``restart``)."""
        self.by_name(name).stop(remove=False)
        self.killed.add(name)

    def restart(self, name: str) -> None:
        """Start a killed node again on its data: it rejoins the cluster."""
        self.by_name(name).start()
        self.killed.discard(name)

    def stop(self) -> None:
        """Kill every node and remove the directory. Safe to call twice."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop(remove=False)
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PrivateRabbitMQCluster:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
