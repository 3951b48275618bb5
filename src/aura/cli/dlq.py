"""``aura dlq``: list, count, show, replay and purge dead letters, for any app's queues.

Every command first files what has landed in the broker's ``aura.dlq`` into the DLQ store
(``DLQ_DATABASE_URL``, else ``DATABASE_URL``), then reads the store: the broker queue is
never browsed, so reading changes no letter, header or order. ``replay`` sends a letter
back to the queue it was dead-lettered from (``--to`` overrides), once, after the same
checks the gateway applies, and records who replayed what and where; ``purge`` removes
only the letters with the reason it names, after asking. Views redact every field before
they cut it and print letters' text literally (no terminal markup or control characters).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

import typer

from aura.cli import app
from aura.cli.names import DEFER_PREFIX, RETRY_PREFIX
from aura.errors import ConfigurationError, InvalidInputError
from aura.events import DeadLetterReason, dead_letter_reason

__all__ = [
    "count_command",
    "literal",
    "ls_command",
    "purge_command",
    "replay_command",
    "replays_command",
    "show_command",
]

if TYPE_CHECKING:
    from aura.messaging.dlq import DeadLetter, DeadLetterQueue

dlq_app = typer.Typer(
    help="The dead-letter queue: ls, count, show, replay, replays, purge.", no_args_is_help=True
)
app.add_typer(dlq_app, name="dlq")

_REASONS = [reason.value for reason in DeadLetterReason]
_LIMIT_MAX = 1000


def _a_reason(text: str) -> bool:
    """Aura's reasons, or one a user's rule names (``CustomReason``)."""
    try:
        dead_letter_reason(text)
    except ConfigurationError:
        return False
    return True


_PLATFORM_APP = "aura.worker.celery_app:celery_app"


def _check_reason(reason: str | None) -> str | None:
    if reason is not None and not _a_reason(reason):
        raise InvalidInputError(
            f"unknown reason {reason!r}; expected one of {', '.join(_REASONS)} "
            "(or a reason of your own rules: snake_case)",
            field="reason",
        )
    return reason


def _when(text: str | None, name: str) -> datetime | None:
    if text is None:
        return None
    try:
        found = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInputError(
            f"--{name} must be an ISO 8601 time (2026-12-04T03:00:00+00:00), got {text[:40]!r}",
            field=name,
        ) from None
    if found.tzinfo is None:
        from datetime import UTC

        found = found.replace(tzinfo=UTC)
    return found


@contextmanager
def _reader(celery_app: Any = None) -> Iterator[DeadLetterQueue]:
    from aura.cli.failures import connect_broker
    from aura.config import get_settings
    from aura.messaging.dlq import DeadLetterQueue

    settings = get_settings()
    if settings.celery_broker_url is None or settings.celery_broker_url.startswith("memory"):
        raise ConfigurationError(
            "CELERY_BROKER_URL must point at RabbitMQ to read the DLQ (it is unset or memory://)"
        )
    # One connect, bounded: a broker that is down is one line in 2 s, not 13 s of retries.
    with connect_broker(
        settings.celery_broker_url, transport_options={"confirm_publish": True}
    ) as connection:
        if celery_app is None:
            celery_app = _load_app(_PLATFORM_APP)
        yield DeadLetterQueue(connection, app=celery_app)


def literal(text: str) -> str:
    """``text`` as it may reach a terminal: control and other unprintable characters as
    escapes (``\\x1b``), so no letter can move the cursor, colour or retitle anything."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _row(letter: DeadLetter) -> dict[str, object]:
    """A letter as JSON, as views show it (the reader's fields are redacted already)."""
    return letter.model_dump(mode="json")


def _fit(text: str, width: int) -> str:
    text = literal(text)
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def _table(letters: list[DeadLetter], width: int) -> list[str]:
    """Three lines a letter, each fitted to ``width`` (at least 80) columns: its position,
    id, reason and replays; its message id and when it was dead-lettered; its task, the
    queue it came from and the error."""
    width = max(width, 80)
    lines = [f"{'SEQ':>7} {'ID':<32} {'REASON':<22} REPLAYS", f"{'':>7} MESSAGE ID / AT / TASK"]
    for letter in letters:
        when = letter.dead_lettered_at.strftime("%Y-%m-%d %H:%M:%S")
        lines += [
            _fit(
                f"{letter.seq or 0:>7} {letter.id:<32} {letter.reason.value:<22} "
                f"{letter.replay_count:>3}",
                width,
            ),
            _fit(f"{'':>7} {letter.message_id or '-'}  {when}", width),
            _fit(f"{'':>7} {letter.task or '?'} @ {letter.queue or '?'}: {letter.error}", width),
        ]
    return lines


# The filters every read takes (typer options: one object each, shared by the commands).
_REASON = typer.Option(None, help=f"Only this reason: {', '.join(_REASONS)}.")
_TASK = typer.Option(None, help="Only this task name.")
_QUEUE = typer.Option(None, help="Only letters from this queue.")
_TENANT = typer.Option(None, help="Only this tenant id.")
_SINCE = typer.Option(None, help="Dead-lettered at or after (ISO 8601).")
_UNTIL = typer.Option(None, help="Dead-lettered before (ISO 8601).")


def _filters(
    reason: str | None,
    task: str | None,
    queue: str | None,
    tenant: str | None,
    since: str | None,
    until: str | None,
) -> dict[str, Any]:
    return {
        "reason": _check_reason(reason),
        "task": task,
        "queue": queue,
        "tenant": tenant,
        "since": _when(since, "since"),
        "until": _when(until, "until"),
    }


@dlq_app.command("ls")
def ls_command(
    reason: str | None = _REASON,
    task: str | None = _TASK,
    queue: str | None = _QUEUE,
    tenant: str | None = _TENANT,
    since: str | None = _SINCE,
    until: str | None = _UNTIL,
    limit: int = typer.Option(50, min=1, max=_LIMIT_MAX, help="Show at most this many."),
    after: int | None = typer.Option(None, min=0, help="The next page: the last SEQ shown."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """List dead letters, oldest first and newest last (filters combine)."""
    with _reader() as reader:
        letters = reader.list(
            **_filters(reason, task, queue, tenant, since, until), limit=limit, after=after
        )
    if as_json:
        for letter in letters:
            typer.echo(json.dumps(_row(letter)))
        return
    width = shutil.get_terminal_size((80, 24)).columns
    typer.echo(f"dead letters: {len(letters)} shown")
    for line in _table(letters, width):
        typer.echo(line)
    if len(letters) == limit and letters[-1].seq is not None:
        typer.echo(f"more: aura dlq ls --after {letters[-1].seq}")


@dlq_app.command("count")
def count_command(
    reason: str | None = _REASON,
    task: str | None = _TASK,
    queue: str | None = _QUEUE,
    tenant: str | None = _TENANT,
    since: str | None = _SINCE,
    until: str | None = _UNTIL,
) -> None:
    """Count dead letters (filters combine); without filters, by reason too."""
    filters = _filters(reason, task, queue, tenant, since, until)
    with _reader() as reader:
        total = reader.count(**filters)
        by_reason = reader.count_by_reason() if not any(filters.values()) else {}
    typer.echo(f"dead letters: {total}")
    for name, n in sorted(by_reason.items()):
        typer.echo(f"  {name}: {n}")


@dlq_app.command("show")
def show_command(letter_id: str = typer.Argument(..., help="The dead letter's id.")) -> None:
    """Print one dead letter in full, as JSON (redacted; a malformed message's body as
    its first 64 KiB of text)."""
    with _reader() as reader:
        letter = reader.show(letter_id)
    if letter is None:
        raise InvalidInputError(f"no dead letter with id {literal(letter_id[:80])!r}", field="id")
    typer.echo(json.dumps(_row(letter), indent=2))


def _reset_budgets(message_ids: list[str]) -> None:
    from aura.config import get_settings
    from aura.messaging import RetryTracker

    redis_url = get_settings().redis_url
    if redis_url is None or not message_ids:
        return  # embedded: the stand-in lives in the worker's process

    async def reset() -> None:
        from aura.redis_connect import async_redis

        redis = async_redis(redis_url, socket_timeout=5)
        try:
            for prefix in (RETRY_PREFIX, DEFER_PREFIX):
                tracker = RetryTracker(redis, prefix=prefix)
                for message_id in message_ids:
                    await tracker.reset(message_id)
        finally:
            await redis.aclose()

    try:
        asyncio.run(reset())
    except Exception as exc:  # their TTL ends them; a replay must not wait on Redis
        from aura.logs import describe_exception

        typer.echo(f"note: retry budgets not reset ({describe_exception(exc)})", err=True)


def _load_app(spec: str) -> Any:
    """``module:attribute`` (Celery's ``-A``), imported from the working directory too."""
    import os
    import sys

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attribute or "app")
    except (ImportError, AttributeError) as exc:
        raise InvalidInputError(
            f"--app {spec!r}: cannot load it ({type(exc).__name__}: {exc})", field="app"
        ) from None


@dlq_app.command("replay")
def replay_command(
    letter_id: str | None = typer.Argument(None, help="The dead letter to replay."),
    reason: str | None = typer.Option(None, help="Replay every dead letter with this reason."),
    task: str | None = typer.Option(None, help="... of this task (with --reason, or alone)."),
    queue: str | None = typer.Option(None, help="... from this queue."),
    tenant: str | None = typer.Option(None, help="... of this tenant."),
    to: str | None = typer.Option(None, "--to", help="Send to this queue instead of its own."),
    celery_app: str = typer.Option(
        _PLATFORM_APP, "--app", "-A", help="Your Celery app (module:attribute), for its checks."
    ),
    by: str | None = typer.Option(None, help="Who replays (recorded; default: your user)."),
) -> None:
    """Send dead letters back to the queue each came from, with a fresh retry budget."""
    selecting = any(value is not None for value in (reason, task, queue, tenant))
    if (letter_id is None) == (not selecting):
        raise InvalidInputError(
            "give either a dead letter id or filters (--reason, --task, --queue, --tenant)",
            field="id",
        )
    _check_reason(reason)
    with _reader(_load_app(celery_app)) as reader:
        if letter_id is not None and reader.show(letter_id) is None:
            raise InvalidInputError(
                f"no dead letter with id {literal(letter_id[:80])!r}", field="id"
            )
        report = reader.replay(letter_id=letter_id, reason=reason, to_queue=to, operator=by or "")
    _reset_budgets([letter.message_id for letter in report.replayed])
    for letter in report.replayed:
        typer.echo(
            f"replayed {literal(letter.id)} ({literal(letter.message_id)}) to "
            f"{literal(to or letter.queue)} (replay {letter.replay_count})"
        )
    for letter, why in report.refused:
        typer.echo(f"refused {literal(letter.id)}: {literal(why)}", err=True)
    typer.echo(f"replayed {len(report.replayed)} dead letter(s), refused {len(report.refused)}")
    if letter_id is not None and not report.replayed and not report.refused:
        typer.echo(f"{literal(letter_id)} was already replayed: nothing sent", err=True)
    if report.refused:
        raise typer.Exit(1)


@dlq_app.command("replays")
def replays_command(
    letter_id: str | None = typer.Argument(None, help="Only this dead letter's replays."),
) -> None:
    """The replay record: who replayed which letter, when, and to which queue."""
    with _reader() as reader:
        records = reader.replays(letter_id)
    for record in records:
        typer.echo(
            f"{record['replayed_at']:%Y-%m-%d %H:%M:%S} {literal(record['letter_id'])} "
            f"({literal(record['message_id'])}) -> {literal(record['to_queue'])} "
            f"by {literal(record['operator'])} (replay {record['replay_count']})"
        )
    typer.echo(f"{len(records)} replay(s)")


@dlq_app.command("purge")
def purge_command(
    reason: str = typer.Option(..., help="Remove the dead letters with this reason."),
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation."),
) -> None:
    """Remove dead letters with one reason (asks first); all others stay."""
    _check_reason(reason)
    if not yes:
        typer.confirm(f"Remove every dead letter with reason {reason!r}?", abort=True)
    with _reader() as reader:
        removed = reader.purge(reason=reason)
    typer.echo(f"removed {removed} dead letter(s)")
