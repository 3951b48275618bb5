"""``aura breaker`` and ``aura retries``: the shared state the fleet keeps in Redis.

    aura breaker status [--json]          every breaker's state: each one a process has
                                          used (aura:circuit_breakers) or with state
                                          (SCAN, bounded); one per provider and model,
                                          named llm:{provider}/{model} (CIRCUIT_BREAKER_KEY)
    aura breaker reset NAME               force it closed, fleet-wide
    aura retries ls [--kind retry|defer] [--limit N] [--json]
                                          messages with a failure (or deferral) count
    aura retries show MESSAGE_ID          both counts and their time to live
    aura retries reset MESSAGE_ID         forget both counts (a fresh budget)

Keys are found with SCAN, never KEYS, and every listing stops at ``--limit`` entries or
``--scan`` keys examined, so a large Redis is never blocked.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import typer

from aura.cli import app
from aura.cli.names import DEFER_PREFIX, RETRY_PREFIX
from aura.errors import ConfigurationError, InvalidInputError, NotFoundError
from aura.events import CircuitState

__all__ = ["breaker_reset", "breaker_status", "retries_ls", "retries_reset", "retries_show"]

if TYPE_CHECKING:
    import redis

    from aura.llm.breaker import BreakerRecord

breaker_app = typer.Typer(help="The LLM circuit breakers' shared state.", no_args_is_help=True)
retries_app = typer.Typer(help="Retry and deferral counts per message.", no_args_is_help=True)
app.add_typer(breaker_app, name="breaker")
app.add_typer(retries_app, name="retries")

BREAKER_PREFIX = "aura:circuit_breaker:"
_KINDS = {"retry": RETRY_PREFIX, "defer": DEFER_PREFIX}
_LIMIT_MAX = 10_000
_SCAN_MAX = 1_000_000


@contextmanager
def _redis() -> Iterator[redis.Redis]:
    from aura.cli.failures import CONNECT_TIMEOUT
    from aura.config import get_settings
    from aura.redis_connect import sync_redis

    url = get_settings().redis_url
    if url is None:
        raise ConfigurationError("REDIS_URL must be set: the shared state lives in Redis")
    client = sync_redis(url, socket_timeout=5, socket_connect_timeout=CONNECT_TIMEOUT)
    try:
        client.ping()  # failing: one line naming Redis and its URL, masked (aura.cli.failures)
        yield client
    finally:
        client.close()


def _scan(client: redis.Redis, pattern: str, *, limit: int, scan: int) -> tuple[list[str], bool]:
    """Up to ``limit`` keys matching ``pattern``, examining at most ``scan`` keys; and
    whether there may be more."""
    found: list[str] = []
    cursor, examined = 0, 0
    while True:
        cursor, keys = client.scan(cursor=cursor, match=pattern, count=500)
        examined += 500
        found += [key.decode() if isinstance(key, bytes) else str(key) for key in keys]
        if len(found) >= limit:
            return sorted(found)[:limit], True
        if cursor == 0:
            return sorted(found), False
        if examined >= scan:
            return sorted(found), True


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _check_bounds(limit: int, scan: int) -> None:
    if not 1 <= limit <= _LIMIT_MAX:
        raise InvalidInputError(f"--limit must be between 1 and {_LIMIT_MAX}", field="limit")
    if not 1 <= scan <= _SCAN_MAX:
        raise InvalidInputError(f"--scan must be between 1 and {_SCAN_MAX}", field="scan")


@dataclass(frozen=True)
class _BreakerView:
    name: str
    record: BreakerRecord

    def as_dict(self, now: float) -> dict[str, object]:
        state = self.record.state
        trial_in = max(self.record.open_until - now, 0.0)
        shown = state.value
        if state is CircuitState.OPEN and trial_in == 0:
            shown = "open (next call is a trial)"
        # "llm:{provider}/{model}", "llm:{model}" or "llm:{provider}" (CIRCUIT_BREAKER_KEY)
        scope = self.name.split(":", 1)[1] if ":" in self.name else ""
        provider, _, model = scope.partition("/") if "/" in scope else ("", "", scope)
        first = self.record.first_failure
        return {
            "name": self.name,
            "provider": provider or None,
            "model": model or None,
            "state": shown,
            # failures in the current run (see aura.llm.breaker: the opening rule)
            "consecutive_failures": self.record.failures,
            "run_started_s_ago": round(now - first, 1) if self.record.failures and first else None,
            "trial_in_s": round(trial_in, 1) if state is not CircuitState.CLOSED else None,
        }


@breaker_app.command("status")
def breaker_status(
    as_json: bool = typer.Option(False, "--json", help="One JSON object per breaker, a list."),
    limit: int = typer.Option(100, help="Show at most this many breakers."),
    scan: int = typer.Option(100_000, help="Examine at most this many Redis keys."),
) -> None:
    """Every circuit breaker's fleet-wide state, as the workers share it in Redis."""
    from rich.console import Console
    from rich.table import Table

    from aura.llm.breaker import REGISTRY_KEY, BreakerRecord

    _check_bounds(limit, scan)
    with _redis() as client:
        # Breakers some process has used (REGISTRY_KEY; a breaker that never failed has no
        # state of its own), and any with state that a process made before the registry.
        members: list[bytes] = client.zrange(REGISTRY_KEY, 0, limit)  # type: ignore[assignment]
        registered = [_text(name) for name in members]
        keys, more = _scan(client, f"{BREAKER_PREFIX}*", limit=limit, scan=scan)
        names = sorted({*registered, *(key.removeprefix(BREAKER_PREFIX) for key in keys)})
        more = more or len(names) > limit
        names = names[:limit]
        raws = [client.hgetall(f"{BREAKER_PREFIX}{name}") for name in names]
        views = [
            _BreakerView(name, BreakerRecord.from_redis(raw))
            for name, raw in zip(names, raws, strict=True)
        ]
    now = time.time()  # the breakers' own clock: wall time shared across hosts
    rows = [view.as_dict(now) for view in views]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no breaker in Redis: no process has used one with this REDIS_URL yet")
        return
    table = Table(title="LLM circuit breakers (one per provider and model)")
    for column in ("name", "state", "failures in a row", "run began", "trial in"):
        table.add_column(column)
    for row in rows:
        trial = "" if row["trial_in_s"] is None else f"{row['trial_in_s']} s"
        began = "" if row["run_started_s_ago"] is None else f"{row['run_started_s_ago']} s ago"
        failures = str(row["consecutive_failures"])
        table.add_row(str(row["name"]), str(row["state"]), failures, began, trial)
    Console().print(table)
    if more:
        typer.echo("(more may exist: raise --limit or --scan)")


@breaker_app.command("reset")
def breaker_reset(name: str = typer.Argument(..., help="The breaker's name (see status).")) -> None:
    """Force a breaker closed, fleet-wide; the next calls go to the provider."""
    from aura.config import get_settings
    from aura.llm.breaker import REGISTRY_KEY, CircuitBreaker
    from aura.redis_connect import async_redis

    with _redis() as client:
        known = client.exists(f"{BREAKER_PREFIX}{name}")
        if not known and client.zscore(REGISTRY_KEY, name) is None:
            raise NotFoundError(f"no breaker named {name!r} in Redis (see aura breaker status)")

    async def reset() -> None:
        shared = async_redis(str(get_settings().redis_url), socket_timeout=5)
        try:
            await CircuitBreaker(name, redis=shared).reset()
        finally:
            await shared.aclose()

    asyncio.run(reset())
    typer.echo(f"breaker {name!r} reset: closed fleet-wide")


@retries_app.command("ls")
def retries_ls(
    kind: str = typer.Option("retry", help="retry (failures) or defer (deferrals)."),
    limit: int = typer.Option(50, help="Show at most this many messages."),
    scan: int = typer.Option(100_000, help="Examine at most this many Redis keys."),
    as_json: bool = typer.Option(False, "--json", help="A JSON list."),
) -> None:
    """Messages with a count in Redis: failures being retried (or deferrals)."""
    from rich.console import Console
    from rich.table import Table

    if kind not in _KINDS:
        raise InvalidInputError(f"--kind must be retry or defer, got {kind!r}", field="kind")
    _check_bounds(limit, scan)
    prefix = _KINDS[kind]
    with _redis() as client:
        keys, more = _scan(client, f"{prefix}*", limit=limit, scan=scan)
        with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.get(key)
                pipe.ttl(key)
            answers = pipe.execute()
    rows = [
        {"message_id": key.removeprefix(prefix), "count": int(count or 0), "ttl_s": int(ttl)}
        for key, count, ttl in zip(keys, answers[::2], answers[1::2], strict=True)
        if count is not None  # expired between SCAN and GET
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{kind} counts ({prefix}*)")
    for column in ("message id", "count", "expires in"):
        table.add_column(column)
    for row in rows:
        table.add_row(str(row["message_id"]), str(row["count"]), f"{row['ttl_s']} s")
    Console().print(table)
    if more:
        typer.echo("(more may exist: raise --limit or --scan)")


@retries_app.command("show")
def retries_show(message_id: str = typer.Argument(..., help="The task (message) id.")) -> None:
    """A message's failure and deferral counts, and when each expires."""
    from aura.message_id import validate_message_id

    checked = validate_message_id(message_id)
    with _redis() as client:
        shown = {
            kind: {
                "count": int(client.get(prefix + checked) or 0),
                "ttl_s": max(int(client.ttl(prefix + checked)), 0),
            }
            for kind, prefix in _KINDS.items()
        }
    typer.echo(json.dumps({"message_id": checked, **shown}, indent=2))


@retries_app.command("reset")
def retries_reset(message_id: str = typer.Argument(..., help="The task (message) id.")) -> None:
    """Forget a message's failure and deferral counts: its next failure starts afresh."""
    from aura.message_id import validate_message_id

    checked = validate_message_id(message_id)
    with _redis() as client:
        removed = int(client.delete(*(prefix + checked for prefix in _KINDS.values())))
    typer.echo(f"{checked}: {removed} count(s) removed")
