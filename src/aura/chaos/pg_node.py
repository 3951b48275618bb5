"""A PostgreSQL primary and one streaming replica of one's own, for failover scenarios.

``PrivatePostgres`` builds both from the machine's binaries (``/usr/lib/postgresql/<v>/bin``:
initdb, postgres, pg_basebackup; psql and pg_isready to look at them):

    server    made by                                  listens on
    primary   initdb (trust for 127.0.0.1 and local,   127.0.0.1:<free port>, and a unix
              wal_level=replica, 5 WAL senders)        socket in its own directory
    replica   pg_basebackup -R -C (a physical slot,    127.0.0.1:<free port>, same socket
              ``aura_replica``), a hot standby          directory
              streaming from the primary

``synchronous=True`` (or ``replicate_synchronously()`` later) sets
``synchronous_standby_names = '*'`` on the primary (with ``ALTER SYSTEM`` once the replica
streams, so the replica's copy of the configuration never has it: promoted, it must not
wait for a standby it does not have): a COMMIT returns once the replica has flushed its
WAL (``synchronous_commit = on``). Without it a COMMIT returns once the primary has, and
the replica follows a moment later. ``wait_replicated`` returns once the replica has
replayed what the primary wrote so far (a standby still replaying a CREATE DATABASE
refuses connections to that database).

What it may do to them: ``crash_primary`` SIGKILLs the primary's postmaster and every
process it forked, all at once (its clients and the replica's WAL receiver see their
connections dropped, as when a host dies: no shutdown checkpoint, nothing more sent);
``promote_replica`` runs ``pg_promote()`` and returns once the replica takes writes;
``detach_replica`` cuts its WAL stream, so what the primary commits after it is never
replicated (how a test shows what asynchronous replication may lose, without a race).
``stop`` kills both and removes the directory it made; nothing else is touched.

Why it is built so: PostgreSQL refuses to run as root, so when this process is root the
servers (and initdb, pg_basebackup) run as the ``postgres`` OS user, and their data live
in a 0700 directory of that user's under the system's temporary directory (a run's
scratch directory is root's 0700: ``postgres`` could not reach into it). The servers'
logs go to ``directory`` (opened here and handed to them as stdout). ``fsync=off``: a
SIGKILLed process loses nothing the kernel holds, and these servers never outlive a power
cut; what a crash may lose is what the replica had not received, which is the point.

Measured on this 2-core machine, shared (load ~2): ``start()`` until the replica streams
1.4-2.3 s, synchronous or not; both servers idle about 30 MiB PSS (130 MiB of RSS summed
over their 12 processes, each counting the shared buffers it touched; ``shared_buffers``
32 MB each); ``crash_primary`` 4-9 ms; ``promote_replica`` 0.12-0.13 s.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from aura.chaos.broker_node import free_port
from aura.errors import ConfigurationError

__all__ = ["PrivatePostgres", "postgres_binaries"]

_SLOT = "aura_replica"
# wal_retrieve_retry_interval: a promote request that lands as the standby starts waiting
# to retry its stream is seen only when that wait ends (15.20: "received promote request",
# "waiting for WAL to become available", "redo done" 5.0 s later; 1 crash in 8 under
# pgbench). At 200 ms: 12 in 12 promoted in 0.13-0.15 s.
_CONFIGURATION = """
listen_addresses = '127.0.0.1'
unix_socket_directories = '{sockets}'
wal_level = replica
max_wal_senders = 5
max_replication_slots = 5
hot_standby = on
fsync = off
shared_buffers = 32MB
max_connections = 100
wal_receiver_status_interval = 1s
wal_retrieve_retry_interval = 200ms
log_min_messages = warning
"""


def postgres_binaries() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` that has initdb (or
    ``AURA_PG_BIN``); ConfigurationError when there is none."""
    override = os.environ.get("AURA_PG_BIN")
    candidates = [Path(override)] if override else []
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
        reverse=True,
    )
    for candidate in [*candidates, *versions]:
        if (candidate / "initdb").exists() and (candidate / "pg_basebackup").exists():
            return candidate
    raise ConfigurationError(
        "no PostgreSQL server binaries (/usr/lib/postgresql/<version>/bin/initdb): "
        "a private PostgreSQL needs them (or AURA_PG_BIN)"
    )


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (a postmaster's backends, WAL sender, ...)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                if int(stat.rpartition(")")[2].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def _kill_tree(process: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL a postmaster and everything it forked, at once: stopped first, so it forks
    nothing between the look at its children and the kill (each child is a session leader
    of its own, so a process-group kill would miss them)."""
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGSTOP)
    for pid in [*_children(process.pid), process.pid]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


class PrivatePostgres:
    """A primary and a streaming replica of the caller's own (see the module docstring)."""

    def __init__(
        self, directory: Path, *, synchronous: bool = False, start_timeout: float = 60.0
    ) -> None:
        self.directory = directory
        self.synchronous = synchronous
        self.start_timeout = start_timeout
        self.primary_port = free_port()
        self.replica_port = free_port()
        self.root: Path | None = None  # made by start(), removed by stop()
        self.primary: subprocess.Popen[bytes] | None = None
        self.replica: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self.promoted = False
        self._bin = postgres_binaries()
        self._account: dict[str, Any] = {}
        if os.geteuid() == 0:  # PostgreSQL will not run as root
            user = pwd.getpwnam("postgres")
            self._account = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    # -- URLs ------------------------------------------------------------------------------
    def url(self, database: str) -> str:
        """SQLAlchemy's multi-host form: both servers, whichever takes writes is used."""
        hosts = f"host=127.0.0.1:{self.primary_port}&host=127.0.0.1:{self.replica_port}"
        return f"postgresql+asyncpg://postgres@/{database}?{hosts}&target_session_attrs=read-write"

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    # -- start and stop --------------------------------------------------------------------
    def start(self) -> None:
        """Both servers up and the replica streaming (synchronous, when asked), within
        ``start_timeout`` seconds; else both are stopped and ConfigurationError raised."""
        started = time.monotonic()
        deadline = started + self.start_timeout
        try:
            self._make_root()
            assert self.root is not None
            primary = self.root / "primary"
            self._tool("initdb", "-D", primary, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                       "--locale=C", "--no-sync", "--no-instructions")  # fmt: skip
            with (primary / "postgresql.conf").open("a") as conf:
                conf.write(_CONFIGURATION.format(sockets=self.root / "sockets"))
            self.primary = self._launch(primary, self.primary_port, "primary")
            self._wait_ready(self.primary, self.primary_port, deadline)
            self._tool("pg_basebackup", "-h", "127.0.0.1", "-p", str(self.primary_port),
                       "-U", "postgres", "-D", self.root / "replica", "-X", "stream", "-R",
                       "-C", "-S", _SLOT, "--no-sync")  # fmt: skip
            self.replica = self._launch(self.root / "replica", self.replica_port, "replica")
            self._wait_ready(self.replica, self.replica_port, deadline)
            self._wait_for(
                lambda: self.replication_state() == "streaming", deadline, "the replica streaming"
            )
            if self.synchronous:
                self.replicate_synchronously(deadline - time.monotonic())
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started

    def replicate_synchronously(self, within: float = 15.0) -> None:
        """From now on a COMMIT on the primary returns once the replica has flushed it
        (``synchronous_standby_names = '*'`` by ALTER SYSTEM: the primary's alone, so the
        replica, promoted, waits for no one); return once the replica is ``sync``."""
        self.sql(self.primary_port, "ALTER SYSTEM SET synchronous_standby_names = '*'")
        self.sql(self.primary_port, "SELECT pg_reload_conf()")
        self._wait_for(
            lambda: self.replication_state() == "streaming sync",
            time.monotonic() + within,
            "the replica streaming synchronously",
        )
        self.synchronous = True

    def _make_root(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="aura-pg-"))
        (self.root / "sockets").mkdir()
        if self._account:
            for path in (self.root, self.root / "sockets"):
                os.chown(path, self._account["user"], self._account["group"])

    def _launch(self, data: Path, port: int, role: str) -> subprocess.Popen[bytes]:
        log: IO[bytes]
        with (self.directory / f"postgres-{role}.log").open("ab") as log:
            # Our own binary and arguments, no shell; its own session (kill_tree finds the
            # rest by parent); the log is handed over as an open file.
            return subprocess.Popen(  # noqa: S603
                [str(self._bin / "postgres"), "-D", str(data), "-p", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self._account,
            )

    def stop(self) -> None:
        """Kill both servers (bounded) and remove the directory ``start`` made. Safe to
        call twice; the logs in ``directory`` stay."""
        _kill_tree(self.primary)
        _kill_tree(self.replica)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> PrivatePostgres:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- faults ----------------------------------------------------------------------------
    def crash_primary(self) -> None:
        """SIGKILL the primary and all its processes at once, as a host dying."""
        _kill_tree(self.primary)

    def promote_replica(self, within: float = 30.0) -> None:
        """Promote the replica; return once it takes writes (bounded by ``within``)."""
        deadline = time.monotonic() + within
        done = self.sql(self.replica_port, f"SELECT pg_promote(true, {max(1, int(within))})")
        if done != "t":
            raise ConfigurationError(f"pg_promote() on the replica answered {done!r}")
        self._wait_for(
            lambda: self.sql(self.replica_port, "SHOW transaction_read_only") == "off",
            deadline,
            "the promoted replica taking writes",
        )
        self.promoted = True

    def detach_replica(self, within: float = 15.0) -> None:
        """Cut the replica's WAL stream (``primary_conninfo`` emptied and reloaded): from
        now on it receives nothing, a lagging replica made exact. For asynchronous
        replication only: a synchronous primary would hold every COMMIT from now on."""
        self.sql(self.replica_port, "ALTER SYSTEM SET primary_conninfo = ''")
        self.sql(self.replica_port, "SELECT pg_reload_conf()")
        deadline = time.monotonic() + within
        self._wait_for(lambda: self.replication_state() == "", deadline, "the stream cut")

    # -- looking at them -------------------------------------------------------------------
    def sql(self, port: int, statement: str, database: str = "postgres") -> str:
        """One statement through psql (autocommit), its unaligned output; raise
        ConfigurationError when it fails."""
        done = subprocess.run(  # noqa: S603 - the machine's psql, our own statement
            [str(self._bin / "psql"), "-X", "-q", "-A", "-t", "-h", "127.0.0.1", "-p",
             str(port), "-U", "postgres", "-d", database, "-c", statement],
            capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, "PGCONNECT_TIMEOUT": "3"},
        )  # fmt: skip
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
            error = next((line for line in lines if "ERROR" in line or "FATAL" in line), lines[0])
            raise ConfigurationError(f"psql on port {port}: {error[:200]}")
        return done.stdout.strip()

    def wait_replicated(self, within: float = 15.0) -> None:
        """Return once the replica has replayed all the primary has written so far."""
        written = self.sql(self.primary_port, "SELECT pg_current_wal_lsn()")
        caught_up = f"SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '{written}') >= 0"
        deadline = time.monotonic() + within
        self._wait_for(
            lambda: self.sql(self.replica_port, caught_up) == "t", deadline, "the replica"
        )

    def replication_state(self) -> str:
        """The primary's view of its standby: ``streaming async``, ``streaming sync`` or ''."""
        try:
            return self.sql(
                self.primary_port,
                "SELECT state || ' ' || sync_state FROM pg_stat_replication LIMIT 1",
            ).replace("streaming async", "streaming")
        except ConfigurationError:
            return ""

    def _accepts(self, port: int) -> bool:
        done = subprocess.run(  # noqa: S603 - the machine's pg_isready
            [str(self._bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port), "-t", "2",
             "-U", "postgres", "-d", "postgres"],
            capture_output=True, timeout=10, check=False,
        )  # fmt: skip
        return done.returncode == 0

    def _wait_ready(self, process: subprocess.Popen[bytes], port: int, deadline: float) -> None:
        def ready() -> bool:
            if process.poll() is not None:
                raise ConfigurationError(f"postgres on port {port} exited: {self._tail(port)}")
            return self._accepts(port)

        self._wait_for(ready, deadline, f"postgres on port {port} accepting connections")

    @staticmethod
    def _wait_for(condition: Any, deadline: float, what: str) -> None:
        while not condition():
            if time.monotonic() > deadline:
                raise ConfigurationError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def log_lines(self, role: str, *words: str, limit: int = 20) -> list[str]:
        """The last ``limit`` lines of the ``primary``'s or ``replica``'s log holding any
        of ``words`` (all lines without)."""
        try:
            text = (self.directory / f"postgres-{role}.log").read_text(errors="replace")
        except OSError:
            return []
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return [line for line in lines if not words or any(w in line for w in words)][-limit:]

    def _tail(self, port: int) -> str:
        role = "primary" if port == self.primary_port else "replica"
        return " | ".join(self.log_lines(role, limit=5))[:600] or "no output"

    def _tool(self, name: str, *arguments: str | Path) -> None:
        """initdb or pg_basebackup, as the servers' user; ConfigurationError on failure."""
        done = subprocess.run(  # noqa: S603 - the machine's binaries, our own arguments
            [str(self._bin / name), *map(str, arguments)],
            capture_output=True, text=True, timeout=120, check=False, cwd="/",
            **self._account,
        )  # fmt: skip
        if done.returncode != 0:
            error = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ConfigurationError(f"{name} failed: {error[0][:300]}")
