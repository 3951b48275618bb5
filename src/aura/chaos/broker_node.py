"""A RabbitMQ node of one's own, for tests and chaos scenarios that must break the broker.

``PrivateRabbitMQ`` starts one single-node RabbitMQ (the machine's ``rabbitmq-server``,
3.10 on Debian 12) on free loopback ports, with everything it owns in one directory:

    node name         ``aura-<token>@localhost``
    AMQP, dist ports  free loopback ports (RABBITMQ_NODE_PORT, RABBITMQ_DIST_PORT)
    data, logs        <directory>/mnesia, <directory>/log
    config            <directory>/rabbitmq.conf (the listener), enabled_plugins (none),
                      env.conf (RABBITMQ_CONF_ENV_FILE: else the machine's is read, and
                      with it the machine's node name), the pid file
    Erlang cookie     the machine's (the Debian wrapper runs the node and rabbitmqctl as
                      the ``rabbitmq`` user, whose HOME holds it)

What it may do to the node: ``block_publishers`` raises a memory alarm (the watermark set
to 1 byte), so the broker blocks every connection that publishes, as a real memory alarm
does; ``unblock_publishers`` restores the default watermark (0.4). ``stop`` kills the node
(SIGKILL, no goodbye) and removes its directory. Every ``rabbitmqctl`` it runs names its
own node (``-n``): nothing here talks to, stops or reconfigures the machine's RabbitMQ.

Measured start (``start()`` until ``await_startup`` answers) on this 2-core machine:
3.9-4.5 s, about 130 MiB of memory.

RabbitMQ tells a connection it is blocked (``connection.blocked``) only once the
connection publishes under the alarm; an idle connection is told nothing (measured on
3.10.8: idle for 3 s under the alarm, no frame).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from aura.errors import ConfigurationError

__all__ = ["PrivateRabbitMQ", "free_port"]

_SERVER = "rabbitmq-server"
_CTL = "rabbitmqctl"
_SBIN = "/usr/sbin"  # Debian's wrappers: not on every user's PATH
_DEFAULT_WATERMARK = "0.4"
_ENV_FILE = (  # loopback only, as the machine's own node
    "ERL_EPMD_ADDRESS=127.0.0.1\n"
    'SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"\n'
)


def free_port() -> int:
    """A TCP port free on loopback now (the caller's server binds it next)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _tool(name: str) -> str:
    found = shutil.which(name, path=f"{os.environ.get('PATH', '')}:{_SBIN}")
    if found is None:
        raise ConfigurationError(f"{name} is not installed here: a private RabbitMQ needs it")
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that may never reap it is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


class PrivateRabbitMQ:
    """One RabbitMQ node of the caller's own (see the module's docstring); a context
    manager that starts it and stops it."""

    def __init__(
        self, directory: Path | None = None, *, start_timeout: float = 90.0, name: str = ""
    ) -> None:
        self.token = secrets.token_hex(4)
        self.node = f"{name or f'aura-{self.token}'}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.start_timeout = start_timeout
        self._own_directory = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix=f"aura-rabbitmq-{self.token}-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None

    @property
    def url(self) -> str:
        """The default vhost's URL (``guest`` may log in from loopback only: this is)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @property
    def pid_file(self) -> Path:
        return self.directory / "rabbitmq.pid"

    def _environment(self) -> dict[str, str]:
        kept = {k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "LANG", "TMPDIR"}}
        return {
            **kept,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.directory / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_CONF_ENV_FILE": str(self.directory / "env.conf"),
        }

    def _prepare(self) -> None:
        for sub in ("mnesia", "log"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        (self.directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users.guest = true\n"
        )
        (self.directory / "enabled_plugins").write_text("[].\n")
        (self.directory / "env.conf").write_text(_ENV_FILE)
        if os.geteuid() == 0:  # the wrapper runs the node as ``rabbitmq``: let it write here
            self.directory.chmod(0o755)
            for path in (self.directory, *self.directory.rglob("*")):
                shutil.chown(path, "rabbitmq", "rabbitmq")

    def start(self) -> None:
        """Start the node; return once AMQP answers and ``await_startup`` succeeds (at most
        ``start_timeout`` seconds), else stop it and raise ConfigurationError. A node
        stopped with ``remove=False`` starts again on its data (a restart)."""
        started = time.monotonic()
        self.launch()
        try:
            self.wait_started(started + self.start_timeout)
        except BaseException:
            self.stop(remove=False)  # its logs stay for whoever reads the error
            raise
        self.startup_seconds = time.monotonic() - started

    def launch(self) -> None:
        """Start the node's process and return at once (``start`` waits for it)."""
        server = _tool(_SERVER)
        self._prepare()
        with (self.directory / "server.out").open("wb") as output:
            # Our own binary and arguments, no shell; its own session, so stop() can kill it.
            self.process = subprocess.Popen(  # noqa: S603
                [server],
                env=self._environment(),
                cwd=self.directory,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_started(self, deadline: float) -> None:
        """Wait until AMQP answers and ``await_startup`` succeeds (``deadline``: monotonic)."""
        while not self._port_answers():
            if self.process is not None and self.process.poll() is not None:
                raise ConfigurationError(f"RabbitMQ node {self.node} exited: {self._tail()}")
            if time.monotonic() > deadline:
                raise ConfigurationError(
                    f"RabbitMQ node {self.node} did not listen on port {self.port} in time"
                )
            time.sleep(0.1)
        left = max(1, int(deadline - time.monotonic()))
        try:
            self.ctl("await_startup", "--timeout", str(left), timeout=left + 10)
        except (ConfigurationError, subprocess.TimeoutExpired) as exc:
            raise ConfigurationError(
                f"RabbitMQ node {self.node} did not finish starting: {self._tail()}"
            ) from exc

    def _port_answers(self) -> bool:
        """The AMQP listener answers a protocol header with its own (or closes on it)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
                raw.sendall(b"AMQP\x00\x00\x09\x01")
                return raw.recv(8) != b""
        except OSError:
            return False

    def _tail(self) -> str:
        try:
            lines = (self.directory / "server.out").read_text(errors="replace").splitlines()
        except OSError:
            return "no output"
        return " | ".join(line.strip() for line in lines[-5:] if line.strip())[:600]

    def ctl(self, *arguments: str, timeout: float = 60) -> str:
        """``rabbitmqctl -n <this node> ...``: never the machine's node."""
        done = subprocess.run(  # noqa: S603 - fixed tool, our own arguments
            [_tool(_CTL), "-q", "-n", self.node, *arguments],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            error = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ConfigurationError(f"rabbitmqctl {arguments[0]} on {self.node}: {error[0]}")
        return done.stdout

    def block_publishers(self) -> None:
        """A memory alarm: the node blocks every connection that publishes."""
        self.ctl("set_vm_memory_high_watermark", "absolute", "1")

    def unblock_publishers(self) -> None:
        """Clear the alarm: the default watermark again; blocked connections are told."""
        self.ctl("set_vm_memory_high_watermark", _DEFAULT_WATERMARK)

    def queue_depth(self, queue: str, vhost: str = "/") -> int:
        """Messages in ``queue`` (ready and unacknowledged); 0 if there is no such queue."""
        listed = self.ctl("list_queues", "-p", vhost, "--no-table-headers", "name", "messages")
        for line in listed.splitlines():
            name, _, count = line.rpartition("\t")
            if name == queue:
                return int(count)
        return 0

    def _pids(self) -> set[int]:
        """The node's processes: the pid file's, and any whose environment names our own
        pid file (a node killed before it wrote one)."""
        pids: set[int] = set()
        with contextlib.suppress(OSError, ValueError):
            pids.add(int(self.pid_file.read_text().strip()))
        marker = f"RABBITMQ_PID_FILE={self.pid_file}".encode()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if marker in (entry / "environ").read_bytes().split(b"\0"):
                        pids.add(int(entry.name))
        return pids

    def stop(self, *, remove: bool = True) -> None:
        """Kill the node (SIGKILL: its clients see a dropped connection) and, unless told
        otherwise, remove its directory. Safe to call twice."""
        pids = self._pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=15)
            self.process = None
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        if remove and self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PrivateRabbitMQ:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
