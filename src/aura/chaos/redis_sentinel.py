"""A Redis Sentinel group of the run's own: a primary, one replica and three sentinels, each
a ``redis-server`` on a free loopback port, so a scenario may kill the primary and watch
the sentinels promote the replica (never the machine's Redis).

    node        started as                                      state
    primary     redis-server --port P (no persistence)           a crash loses it
    replica     redis-server --port R --replicaof 127.0.0.1 P
    sentinels   redis-server sentinel-N/sentinel.conf --sentinel  monitor ``aura`` at P,
                (3, each with a config file it may rewrite)     quorum 2, down after 1 s

The interface is ``PrivateRedis``'s (``url``, ``start``, ``stop``, ``restart``,
``answers``, ``restarts``), ``url`` being the ``redis+sentinel://`` URL of the group;
beyond it, the failover's steps: ``kill_primary`` (SIGKILL), ``wait_for_new_primary``
(until the sentinels name another master and it says it is one) and
``restart_old_primary`` (the killed server back on its port, as a master with no data, as a
restarted server comes back; the sentinels make it a replica of the new master, and this
waits for its link to be up). Every wait is bounded and polls the servers themselves.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import redis

from aura.errors import ConfigurationError

__all__ = ["SERVICE", "PrivateSentinelRedis"]

SERVICE = "aura"  # the name the sentinels monitor the primary by
_HOST = "127.0.0.1"
_DOWN_AFTER_MS = 1000
_FAILOVER_TIMEOUT_MS = 3000
_PING_PERIOD_MS = 250  # Sentinel's default is 1000: see _start_sentinel
_START_BOUND_S = 20.0
_POLL_S = 0.05
T = TypeVar("T")


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (held open together, so none repeats)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind((_HOST, 0))
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _until(condition: Callable[[], T | None], bound_s: float, what: str) -> T:
    """Poll ``condition`` until it returns something true; ``ConfigurationError`` naming
    ``what`` after ``bound_s`` seconds."""
    deadline = time.monotonic() + bound_s
    while True:
        try:
            found = condition()
        except (redis.RedisError, OSError):
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            raise ConfigurationError(
                f"the run's Redis Sentinel group: {what} (after {bound_s:g} s)"
            )
        time.sleep(_POLL_S)


def _client(port: int) -> redis.Redis:
    return redis.Redis(host=_HOST, port=port, socket_timeout=0.5, socket_connect_timeout=0.5)


def _ask(port: int, *command: str) -> object:
    client = _client(port)
    try:
        return client.execute_command(*command)
    finally:
        client.close()


def _replication(port: int) -> dict[str, object]:
    client = _client(port)
    try:
        info: dict[str, object] = client.info("replication")
        return info
    finally:
        client.close()


class PrivateSentinelRedis:
    """A primary, a replica and three sentinels of the run's own, in ``directory``."""

    def __init__(self, directory: Path, *, quick: bool = False) -> None:
        self.directory = directory
        # Sentinel's own periods shortened (INFO every 1 s, hellos every 0.5 s): the group
        # forms, and a returning primary is made a replica, in seconds instead of 10-20 s.
        self.quick = quick
        ports = _free_ports(5)
        self.data_ports, self.sentinel_ports = ports[:2], ports[2:]
        self._primary = self.data_ports[0]
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        self.killed: int | None = None  # the primary ``kill_primary`` killed, until it returns
        self.restarts = 0

    # -- what PrivateRedis has ---------------------------------------------------------
    @property
    def url(self) -> str:
        sentinels = ",".join(f"{_HOST}:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{sentinels}/{SERVICE}/0"

    @property
    def primary_port(self) -> int:
        """The data node the sentinels name as master (as far as this object knows)."""
        return self._primary

    @property
    def replica_port(self) -> int:
        return next(port for port in self.data_ports if port != self._primary)

    @property
    def port(self) -> int:
        return self._primary

    def start(self) -> None:
        """Start every node not running, and wait until the replica follows the primary
        and each sentinel names the primary and knows the replica and the two others."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise ConfigurationError(
                "redis-server is not installed here: aura chaos runs a Redis of its own"
            )
        for port in self.data_ports:
            if port != self.killed and not self._running(port):
                self._start_data_node(
                    exe, port, replica_of=None if port == self._primary else self._primary
                )
        for index, port in enumerate(self.sentinel_ports):
            if not self._running(port):
                self._start_sentinel(exe, index, port)
        if self.killed is None:
            _until(self._replica_linked, _START_BOUND_S, "the replica never linked to the primary")
        _until(self._sentinels_ready, _START_BOUND_S, "the sentinels never agreed on the group")

    def stop(self) -> None:
        """Kill all five (no save, no goodbye), bounded."""
        for port in list(self._processes):
            self._kill(port)

    def restart(self, down_s: float) -> None:
        """Both data nodes killed (their data lost), down for ``down_s``, started again in
        the roles the sentinels know; the sentinels keep running."""
        for port in self.data_ports:
            self._kill(port)
        time.sleep(down_s)  # down for a while, as a real restart is
        self.start()
        self.restarts += 1

    def answers(self) -> bool:
        """The primary answers PING and the sentinels are up."""
        return (
            self._running(self._primary)
            and all(self._running(port) for port in self.sentinel_ports)
            and _pings(self._primary)
        )

    # -- the failover's steps --------------------------------------------------------------
    def kill_primary(self) -> int:
        """SIGKILL the primary (the master the sentinels name); its port."""
        named = self._named_master()
        port = named if named in self.data_ports else self._primary
        self._kill(port)
        self.killed = port
        return port

    def wait_for_new_primary(self, timeout: float = 30.0) -> int:
        """Until the sentinels name another master and that server says it is one; its
        port."""

        def promoted() -> int | None:
            port = self._named_master()
            if port is None or port == self.killed or port not in self.data_ports:
                return None
            return port if _replication(port).get("role") == "master" else None

        port = _until(promoted, timeout, "no new master was named")
        self._primary = port
        return port

    def restart_old_primary(self, timeout: float = 30.0) -> int:
        """The killed primary back on its port, as a master with no data (a restarted
        server with no persistence); wait until the sentinels have made it a replica of
        the new master and its link is up. Its port."""
        port = self.killed
        if port is None:
            raise ConfigurationError("restart_old_primary: no primary was killed")
        exe = shutil.which("redis-server")
        assert exe is not None, "started before: redis-server is installed"
        (self._node_dir(port) / "dump.rdb").unlink(missing_ok=True)  # it crashed: no data
        self._start_data_node(exe, port, replica_of=None)
        self.killed = None

        def demoted() -> bool:
            info = _replication(port)
            return (
                info.get("role") == "slave"
                and info.get("master_port") == self._primary
                and info.get("master_link_status") == "up"
            )

        _until(demoted, timeout, f"the old primary ({port}) never became a replica")
        return port

    def role(self, port: int) -> str:
        """What the server on ``port`` says it is (``master``, ``slave``), asked now."""
        return str(_replication(port).get("role"))

    # -- inside ------------------------------------------------------------------------
    def _node_dir(self, port: int) -> Path:
        path = self.directory / f"node-{port}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _running(self, port: int) -> bool:
        process = self._processes.get(port)
        return process is not None and process.poll() is None

    def _spawn(self, port: int, command: list[str]) -> None:
        # Our own binary and arguments, no shell.
        self._processes[port] = subprocess.Popen(  # noqa: S603
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _until(lambda: _pings(port), _START_BOUND_S, f"the server on port {port} did not start")

    def _start_data_node(self, exe: str, port: int, *, replica_of: int | None) -> None:
        directory = self._node_dir(port)
        command = [exe, "--bind", _HOST, "--port", str(port), "--save", "", "--appendonly", "no"]
        command += ["--dir", str(directory), "--logfile", str(directory / "redis.log")]
        command += ["--repl-diskless-sync-delay", "0"]  # a replica's sync starts at once
        if replica_of is not None:
            command += ["--replicaof", _HOST, str(replica_of)]
        self._spawn(port, command)

    def _start_sentinel(self, exe: str, index: int, port: int) -> None:
        directory = self.directory / f"sentinel-{index}"
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "sentinel.conf"
        if not config.exists():  # else the one it rewrote: what it has learnt since
            config.write_text(
                f"port {port}\nbind {_HOST}\ndir {directory}\n"
                f"logfile {directory / 'sentinel.log'}\n"
                f"sentinel monitor {SERVICE} {_HOST} {self._primary} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {_DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {_FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
        self._spawn(port, [exe, str(config), "--sentinel"])
        # A sentinel pings an instance first a ping period (1 s) after it starts watching
        # it, and counts it down once down-after passes with no answer: with both at 1 s a
        # master just promoted is found "down" before its first PONG, and a second
        # failover follows (seen: to the old primary, back empty a second before).
        periods = ["ping-period", str(_PING_PERIOD_MS)]
        if self.quick:
            periods += ["info-period", "1000", "publish-period", "500"]
        _ask(port, "SENTINEL", "DEBUG", *periods)

    def _kill(self, port: int) -> None:
        process = self._processes.pop(port, None)
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=10)

    def _named_master(self) -> int | None:
        """The master's port as every sentinel that answers names it (None while they
        differ: the new configuration is still spreading)."""
        named: set[int] = set()
        for port in self.sentinel_ports:
            try:
                answer = _ask(port, "SENTINEL", "get-master-addr-by-name", SERVICE)
            except (redis.RedisError, OSError):
                continue
            if isinstance(answer, list | tuple) and len(answer) == 2:
                named.add(int(answer[1]))
        return named.pop() if len(named) == 1 else None

    def _replica_linked(self) -> bool:
        info = _replication(self.replica_port)
        return info.get("master_port") == self._primary and info.get("master_link_status") == "up"

    def _sentinels_ready(self) -> bool:
        for port in self.sentinel_ports:
            client = _client(port)
            try:
                state = client.sentinel_master(SERVICE)
            finally:
                client.close()
            if not isinstance(state, dict):
                return False
            known = int(state.get("num-slaves", 0)) >= 1
            known = known and int(state.get("num-other-sentinels", 0)) == 2
            if int(state.get("port", 0)) != self._primary or not known:
                return False
        return True


def _pings(port: int) -> bool:
    try:
        with socket.create_connection((_HOST, port), timeout=0.2) as raw:
            raw.sendall(b"PING\r\n")
            return raw.recv(16).startswith(b"+PONG")
    except OSError:
        return False
