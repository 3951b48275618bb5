"""The envelope guard: whatever arrives on a work queue, no message can stop a worker.

Celery trusts its queues. A body that is not JSON is logged and acked (lost); a JSON body
that is not ``[args, kwargs, embed]`` raises inside the consumer and stops the worker
("Unrecoverable error"), and the message, back on the queue, stops the next one; an
unknown task or bad headers are rejected with no reason kept. ``GuardedConsumer`` (set
as the app's ``worker_consumer``) checks every delivery before Celery sees it:

    check (in order)               kind              fate when it fails
    headers: a table with 'task'   not_protocol_2    DLQ (malformed_message), then ack
      and 'id' (Celery protocol 2)
    id is a valid message id       bad_message_id    ...
    content type application/json  content_type      ...
      and encoding utf-8 (or none)
    a compressed body inflates to  inflates_too_far  ... (kept compressed, byte for byte)
      at most MAX_MESSAGE_BYTES
    body <= MAX_MESSAGE_BYTES      too_large         ...
    body decodes as UTF-8 JSON     not_json          ...
    nesting <= MAX_BODY_DEPTH      too_deep          ...
    body is [list, dict, dict]     bad_shape         ...
    retries, eta, expires,         bad_headers       ...
      timelimit well formed
    the task is registered         unknown_task      ...
    the arguments bind to it       bad_arguments     ...
    anything Celery itself raises  rejected          ...
      while taking the message

A malformed message goes to the DLQ as it arrived (bytes, content type, encoding,
headers: ``dead_letter_original``) with the kind and a sentence that says what is wrong,
and is acked only after the broker confirmed the dead letter. If that publish fails the
message is requeued (the queue's delivery limit bounds how often). Connection errors are
never taken for malformed messages: they go up to Celery, which reconnects.

One clock: a retry's ``eta`` header is the sending worker's wall clock plus the countdown.
On a quorum queue the broker itself holds the message for the countdown (kombu's native
delayed delivery: its routing key starts with the delay bits), so the guard drops that
``eta`` before Celery sees it. Kept, a worker whose clock ran 600 s ahead made every other
worker hold its retries 600 s more (``aura chaos clock-skew``: 20 enrichments stranded).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from celery.utils.time import maybe_iso8601
from celery.worker.consumer import Consumer

from aura.errors import InvalidInputError
from aura.logs import bounded_text, describe_exception
from aura.message_id import validate_message_id
from aura.messaging._compression import InflateLimitError, bound_compression
from aura.messaging._delayed_delivery import failover_consumer_steps
from aura.messaging.dlq import dead_letter_original, delayed_by_broker, queue_of

__all__ = [
    "MAX_BODY_DEPTH",
    "MAX_MESSAGE_BYTES",
    "EnvelopeError",
    "GuardedConsumer",
    "check_envelope",
]

MAX_MESSAGE_BYTES = 32 * 1024 * 1024
MAX_BODY_DEPTH = 64
_JSON = "application/json"
_UTF8 = {"", "utf-8", "utf8"}
_EMBED_KEYS = {"callbacks": list, "errbacks": list, "chain": list, "chord": dict}
_MAX_TEXT = 300
_log = structlog.get_logger("aura.messaging.envelope")
bound_compression()  # before any message is built: kombu inflates while it builds one


class EnvelopeError(InvalidInputError):
    """What is wrong with a delivery: ``kind`` (a word) and a sentence."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind


def check_envelope(message: Any, tasks: Mapping[str, Any]) -> None:
    """Raise ``EnvelopeError`` unless ``message`` (a ``kombu.Message``) is a Celery
    protocol 2 message for one of ``tasks`` whose arguments bind. Leaves the decoded body
    cached on the message, so Celery does not parse it again."""
    headers = message.headers
    if not isinstance(headers, dict) or not isinstance(headers.get("task"), str):
        raise EnvelopeError("not_protocol_2", "no 'task' header: not a Celery protocol 2 message")
    try:
        validate_message_id(headers.get("id"))
    except Exception as exc:
        raise EnvelopeError("bad_message_id", f"header 'id': {exc}") from None
    content_type = message.content_type or ""
    encoding = (message.content_encoding or "").lower()
    if content_type != _JSON or encoding not in _UTF8:
        raise EnvelopeError(
            "content_type",
            f"content type {_text(content_type)!r} encoding {_text(encoding)!r}: "
            f"only {_JSON} in utf-8 is accepted",
        )
    body = message.body
    size = len(body) if isinstance(body, bytes | str) else 0
    if size > MAX_MESSAGE_BYTES:
        raise EnvelopeError("too_large", f"body is {size} bytes, over {MAX_MESSAGE_BYTES}")
    payload = _decode(message)
    if _depth_exceeds(payload, MAX_BODY_DEPTH):
        raise EnvelopeError("too_deep", f"body is nested more than {MAX_BODY_DEPTH} deep")
    args, kwargs = _shape(payload)
    _check_headers(headers)
    task = tasks.get(headers["task"])
    if task is None:
        raise EnvelopeError("unknown_task", f"no task named {_text(headers['task'])!r} here")
    _bind(task, args, kwargs)


def _text(value: object) -> str:
    return bounded_text(value if isinstance(value, str) else repr(value), 80)


def _decode(message: Any) -> Any:
    try:
        payload: Any = message.decode()  # kombu's JSON, cached on the message for Celery
        return payload
    except Exception as exc:
        cause = exc.__context__ or exc.__cause__ or exc
        if isinstance(cause, UnicodeDecodeError):
            text = f"body is not UTF-8 (byte 0x{cause.object[cause.start : cause.start + 1].hex()}"
            raise EnvelopeError("not_json", f"{text} at position {cause.start})") from None
        if isinstance(cause, RecursionError):
            raise EnvelopeError("too_deep", "body is nested too deep to parse") from None
        detail = describe_exception(cause, _MAX_TEXT)
        raise EnvelopeError("not_json", f"body is not JSON: {detail}") from None


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Iterative (no recursion), linear in the number of nodes."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list | tuple):
            if depth >= limit:
                return True
            stack.extend((child, depth + 1) for child in node)
    return False


def _shape(payload: Any) -> tuple[list[Any], dict[str, Any]]:
    if not (isinstance(payload, list | tuple) and len(payload) == 3):
        got = f"a list of {len(payload)}" if isinstance(payload, list) else type(payload).__name__
        raise EnvelopeError("bad_shape", f"body must be [args, kwargs, embed], got {got}")
    args, kwargs, embed = payload
    if not isinstance(args, list | tuple):
        raise EnvelopeError("bad_shape", f"args must be a list, got {type(args).__name__}")
    if not isinstance(kwargs, dict):
        raise EnvelopeError("bad_shape", f"kwargs must be an object, got {type(kwargs).__name__}")
    if not isinstance(embed, dict):
        raise EnvelopeError("bad_shape", f"embed must be an object, got {type(embed).__name__}")
    for key, kind in _EMBED_KEYS.items():
        value = embed.get(key)
        if value is not None and not isinstance(value, kind):
            raise EnvelopeError("bad_shape", f"embed.{key} must be a {kind.__name__} or null")
    return list(args), kwargs


def _check_headers(headers: dict[str, Any]) -> None:
    retries = headers.get("retries", 0)
    if retries is not None and (type(retries) is not int or retries < 0):
        raise EnvelopeError(
            "bad_headers", f"header 'retries' must be a count, got {_text(retries)}"
        )
    for name in ("eta", "expires"):
        value = headers.get(name)
        if value is None:
            continue
        try:
            maybe_iso8601(value)
        except Exception:
            raise EnvelopeError(
                "bad_headers", f"header {name!r} is not a date: {_text(value)}"
            ) from None
    limits = headers.get("timelimit")
    if limits is not None and not (
        isinstance(limits, list | tuple)
        and len(limits) == 2
        and all(
            v is None or (isinstance(v, int | float) and not isinstance(v, bool) and v >= 0)
            for v in limits
        )
    ):
        raise EnvelopeError(
            "bad_headers", f"header 'timelimit' must be [soft, hard], got {_text(limits)}"
        )
    for name in ("root_id", "parent_id", "group", "shadow", "argsrepr", "kwargsrepr", "origin"):
        value = headers.get(name)
        if value is not None and not isinstance(value, str):
            raise EnvelopeError("bad_headers", f"header {name!r} must be a string or null")
    for name, kind in (("stamped_headers", list), ("stamps", dict)):
        value = headers.get(name)
        if value is not None and not isinstance(value, kind):
            raise EnvelopeError("bad_headers", f"header {name!r} must be a {kind.__name__}")


def _bind(task: Any, args: list[Any], kwargs: dict[str, Any]) -> None:
    signature = _signature_of(task)
    if signature is None:
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise EnvelopeError(
            "bad_arguments", f"arguments do not fit {_text(task.name)}: {_text(str(exc))}"
        ) from None


def _signature_of(task: Any) -> inspect.Signature | None:
    """The task's own parameters: what ``resilient_task`` recorded, else its ``run``."""
    signature = getattr(task, "aura_signature", None)
    if isinstance(signature, inspect.Signature):
        return signature
    try:
        return inspect.signature(task.run)
    except (TypeError, ValueError):
        return None


def _forget_the_senders_clock(message: Any) -> None:
    """Drop the ``eta`` of a message the broker has already delayed (the module doc)."""
    headers = message.headers
    if (
        isinstance(headers, dict)
        and headers.get("eta") is not None
        and delayed_by_broker(message.delivery_info)
    ):
        headers["eta"] = None


_SHUTDOWN_TICK = 0.5  # seconds: the longest a warm shutdown waits to be noticed


def _tick() -> None:
    """Nothing: its timer only bounds how long Celery's event loop sleeps."""


class GuardedConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer with ``check_envelope`` in front of every task message, and a
    DLQ letter instead of a lost or looping message wherever Celery would give up; its
    delayed delivery set-up is made on the node it is connected to
    (``aura.messaging._delayed_delivery``: no stall on a dead node of a broker list)."""

    class Blueprint(Consumer.Blueprint):  # type: ignore[misc]
        default_steps = failover_consumer_steps(list(Consumer.Blueprint.default_steps))

    _dlq_connection: Any = None

    def register_with_event_loop(self, hub: Any) -> None:
        super().register_with_event_loop(hub)
        # A warm shutdown (SIGTERM) is seen between two polls of Celery's event loop, and
        # a poll with no timer due sleeps up to 10 s (kombu's Hub.fire_timers): a worker
        # with nothing in flight took 6-10 s to stop. A tick bounds that wait.
        hub.call_repeatedly(_SHUTDOWN_TICK, _tick)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        celery_handler = super().create_task_handler(*args, **kwargs)
        tasks = self.app.tasks

        def on_task_received(message: Any) -> Any:
            try:
                check_envelope(message, tasks)
            except EnvelopeError as exc:
                return self._dead_letter(message, exc.kind, str(exc))
            except Exception as exc:  # the guard itself must never stop the worker
                return self._dead_letter(message, "rejected", describe_exception(exc))
            _forget_the_senders_clock(message)
            try:
                return celery_handler(message)
            except self.connection_errors:
                raise
            except Exception as exc:
                return self._dead_letter(message, "rejected", describe_exception(exc))

        return on_task_received

    # What Celery does on its own when a message gets past the guard anyway.
    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        if isinstance(exc, InflateLimitError):  # kept compressed, as it arrived
            self._dead_letter(message, "inflates_too_far", describe_exception(exc))
            return
        self._dead_letter(message, "not_json", describe_exception(exc))

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._dead_letter(message, "not_protocol_2", "not a Celery task message")

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self._dead_letter(message, "unknown_task", f"unknown task: {exc}")

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self._dead_letter(message, "bad_headers", describe_exception(exc))

    def _dead_letter(self, message: Any, kind: str, error: str) -> None:
        queue = queue_of(message.delivery_info)
        try:
            if self._dlq_connection is None:
                self._dlq_connection = self.app.connection_for_write()
            letter = dead_letter_original(
                self._dlq_connection, message, kind=kind, error=error, queue=queue
            )
        except Exception as exc:
            _log.error(
                "malformed message could not be dead-lettered; requeued",
                kind=kind,
                queue=queue,
                error=describe_exception(exc, _MAX_TEXT),
            )
            self._dlq_connection = None
            if not message.acknowledged:
                message.reject(requeue=True)
            return
        if not message.acknowledged:
            message.ack()
        _log.error(
            "malformed message sent to the dead-letter queue",
            kind=kind,
            queue=queue,
            message_id=letter.message_id,
            error=letter.error,
            dead_letter=letter.id,
        )
