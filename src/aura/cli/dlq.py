"""``aura dlq``: read, replay and purge the dead-letter queue.

Reading holds entries unacknowledged and hands them back to the queue when done, so
``ls`` and ``show`` change nothing. ``replay`` sends a dead letter back to its original
queue with a fresh retry budget and removes it from the DLQ only after the broker
confirmed the new message; ``purge`` removes only the entries with the reason it names,
after asking.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import typer

from aura.cli import app
from aura.cli.names import DEFER_PREFIX, DLQ_MAX_SCAN, RETRY_PREFIX
from aura.contract import BULK_QUEUE, REALTIME_QUEUE
from aura.errors import ConfigurationError, InvalidInputError
from aura.events import DeadLetterReason

if TYPE_CHECKING:
    from aura.messaging.dlq import DeadLetter, DeadLetterQueue

MAX_SCAN = DLQ_MAX_SCAN

dlq_app = typer.Typer(
    help="The dead-letter queue: list, show, replay, purge.", no_args_is_help=True
)
app.add_typer(dlq_app, name="dlq")

_REASONS = [reason.value for reason in DeadLetterReason]
_LIMIT_MAX = 1000


def _check_reason(reason: str | None) -> str | None:
    if reason is not None and reason not in _REASONS:
        raise InvalidInputError(
            f"unknown reason {reason!r}; expected one of {', '.join(_REASONS)}", field="reason"
        )
    return reason


def _check_scan(scan: int) -> int:
    if not 1 <= scan <= MAX_SCAN:
        raise InvalidInputError(f"--scan must be between 1 and {MAX_SCAN}", field="scan")
    return scan


@contextmanager
def _reader() -> Iterator[DeadLetterQueue]:
    from kombu.connection import Connection

    from aura.config import get_settings
    from aura.messaging.dlq import DeadLetterQueue

    settings = get_settings()
    if settings.celery_broker_url is None or settings.celery_broker_url.startswith("memory"):
        raise ConfigurationError(
            "CELERY_BROKER_URL must point at RabbitMQ to read the DLQ (it is unset or memory://)"
        )
    with Connection(
        settings.celery_broker_url, transport_options={"confirm_publish": True}
    ) as connection:
        connection.ensure_connection(max_retries=3)
        yield DeadLetterQueue(connection)


_MAX_SHOWN_BODY = 64 * 1024


def _row(letter: DeadLetter) -> dict[str, object]:
    """A letter as JSON; a malformed original's body redacted and cut to 64 KiB (the DLQ
    keeps it whole)."""
    from aura.logs import bounded_text, redact

    row = letter.model_dump(mode="json")
    original = row.get("original")
    if isinstance(original, dict) and isinstance(original.get("body"), str):
        original["body"] = bounded_text(original["body"], _MAX_SHOWN_BODY)
        original["headers"] = redact(original.get("headers") or {})
    return row


@dlq_app.command("ls")
def ls_command(
    reason: str | None = typer.Option(None, help=f"Only this reason: {', '.join(_REASONS)}."),
    task: str | None = typer.Option(None, help="Only this task name."),
    tenant: str | None = typer.Option(None, help="Only this tenant id."),
    limit: int = typer.Option(50, min=1, max=_LIMIT_MAX, help="Show at most this many."),
    scan: int = typer.Option(10_000, help=f"Inspect at most this many entries (<= {MAX_SCAN})."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """List dead letters, newest last (filters combine)."""
    from rich.console import Console
    from rich.table import Table

    with _reader() as reader:
        letters = reader.list(
            reason=_check_reason(reason),
            task=task,
            tenant=tenant,
            limit=limit,
            scan=_check_scan(scan),
        )
    if as_json:
        for letter in letters:
            typer.echo(json.dumps(_row(letter)))
        return
    table = Table(title=f"dead letters ({len(letters)} shown)")
    for column in ("id", "reason", "task", "queue", "retries", "last failure", "error"):
        table.add_column(column, overflow="fold")
    for letter in letters:
        table.add_row(
            letter.id,
            letter.reason.value,
            letter.task,
            letter.queue,
            str(letter.retries),
            letter.last_failure_at.isoformat(timespec="seconds"),
            letter.error[:80],
        )
    Console().print(table)


@dlq_app.command("show")
def show_command(letter_id: str = typer.Argument(..., help="The dead letter's id.")) -> None:
    """Print one dead letter in full, as JSON."""
    with _reader() as reader:
        letter = reader.show(letter_id)
    if letter is None:
        raise InvalidInputError(f"no dead letter with id {letter_id!r}", field="id")
    typer.echo(json.dumps(_row(letter), indent=2))


def _reset_budgets(message_ids: list[str]) -> None:
    from aura.config import get_settings
    from aura.messaging.retry import RetryTracker

    redis_url = get_settings().redis_url
    if redis_url is None:
        return  # embedded: the stand-in lives in the worker's process

    async def reset() -> None:
        from redis.asyncio import Redis

        redis = Redis.from_url(redis_url)
        try:
            for prefix in (RETRY_PREFIX, DEFER_PREFIX):
                tracker = RetryTracker(redis, prefix=prefix)
                for message_id in message_ids:
                    await tracker.reset(message_id)
        finally:
            await redis.aclose()

    asyncio.run(reset())


@dlq_app.command("replay")
def replay_command(
    letter_id: str | None = typer.Argument(None, help="The dead letter to replay."),
    reason: str | None = typer.Option(None, help="Replay every dead letter with this reason."),
    scan: int = typer.Option(10_000, help=f"Inspect at most this many entries (<= {MAX_SCAN})."),
) -> None:
    """Send dead letters back to their original queue with a fresh retry budget."""
    if (letter_id is None) == (reason is None):
        raise InvalidInputError("give either a dead letter id or --reason, not both", field="id")
    from aura.messaging.dlq import replay
    from aura.worker.celery_app import celery_app

    def send(letter: DeadLetter) -> None:
        queue = letter.queue if letter.queue in (REALTIME_QUEUE, BULK_QUEUE) else REALTIME_QUEUE
        _reset_budgets([letter.message_id])
        celery_app.send_task(
            letter.task,
            args=letter.task_args,
            kwargs=letter.task_kwargs,
            task_id=letter.message_id,
            queue=queue,
        )

    with _reader() as reader:
        replayed = replay(
            reader, send, letter_id=letter_id, reason=_check_reason(reason), scan=_check_scan(scan)
        )
    if letter_id is not None and not replayed:
        raise InvalidInputError(f"no dead letter with id {letter_id!r}", field="id")
    typer.echo(f"replayed {len(replayed)} dead letter(s)")


@dlq_app.command("purge")
def purge_command(
    reason: str = typer.Option(..., help="Remove the dead letters with this reason."),
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation."),
    scan: int = typer.Option(10_000, help=f"Inspect at most this many entries (<= {MAX_SCAN})."),
) -> None:
    """Remove dead letters with one reason (asks first); all others stay."""
    from aura.messaging.dlq import purge

    _check_reason(reason)
    if not yes:
        typer.confirm(f"Remove every dead letter with reason {reason!r}?", abort=True)
    with _reader() as reader:
        removed = purge(reader, reason=reason, scan=_check_scan(scan))
    typer.echo(f"removed {len(removed)} dead letter(s)")
