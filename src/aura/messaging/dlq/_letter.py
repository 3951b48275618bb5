"""A dead letter as the DLQ keeps it (``DeadLetter``), a malformed original as views show
it (``OriginalMessage``), and the bounds every text in them is cut to."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr

from aura.events import Reason
from aura.logs import bounded_text
from aura.message_id import validate_message_id

MAX_ERROR = 1000  # characters of an error text
MAX_NAME = 200  # a header name shown in a view
MAX_SHOWN_BODY = 64 * 1024
"""The most characters of a malformed message's body a view shows (redacted)."""
REPLAY_HEADER = "aura_replay_count"
"""The message header that says how often a message was replayed from the DLQ."""


class OriginalMessage(BaseModel):
    """A malformed message as it arrived, as views show it: the first ``MAX_SHOWN_BODY``
    characters of its body as text (bytes that are not UTF-8 as ``\\xNN``), redacted;
    ``cut`` if there was more; its size in bytes, content type, encoding and headers
    (redacted). The bytes themselves stay in the store: ``raw()`` where the reader was
    asked for them (``DeadLetterQueue.list(raw=True)``)."""

    body: str
    body_encoding: Literal["utf-8"] = "utf-8"
    cut: bool = False
    size: int
    content_type: str | None = None
    content_encoding: str | None = None
    headers: dict[str, Any] = Field(default_factory=dict)
    _raw: bytes | None = PrivateAttr(default=None)

    def raw(self) -> bytes:
        """The bytes as they arrived (never printed by Aura's views)."""
        if self._raw is None:
            raise LookupError("read with DeadLetterQueue.list(raw=True) to get the bytes")
        return self._raw


class DeadLetter(BaseModel):
    """One dead letter, as stored in the DLQ (JSON)."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    message_id: str
    reason: Reason
    task: str
    queue: str
    task_args: list[Any] = Field(default_factory=list)
    task_kwargs: dict[str, Any] = Field(default_factory=dict)
    error_type: str = ""
    error: str = ""
    retries: int = 0
    first_failure_at: datetime
    last_failure_at: datetime
    tenant_id: str | None = None
    dead_lettered_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    original: OriginalMessage | None = None  # set for malformed messages only
    fingerprint: str | None = None  # of the payload (aura.messaging._idempotency)
    replay_count: int = 0  # how often it was replayed from the DLQ before this letter
    seq: int | None = None  # its position in the store (newest last); set by reads
    replay_refusal: str | None = None  # why it cannot be replayed, where that is known

    @property
    def fate_key(self) -> tuple[str, str, str]:
        """One fate per message id, reason and payload: the key the reader dedupes on."""
        return (self.message_id or f"letter:{self.id}", self.reason.value, self.fingerprint or "")


def error_text(text: str | None, error: BaseException | None) -> str:
    """One line, at most MAX_ERROR characters, redacted; cut before anything else runs
    (a 10 MB error costs no more than a short one), and never raises."""
    if text is None and error is not None:
        try:
            text = str(error)
        except Exception:
            text = f"<unprintable {type(error).__name__}>"
    head = (text or "")[: MAX_ERROR * 2]
    return bounded_text(" ".join(head.split()), MAX_ERROR)


def bounded(value: Any, limit: int = 200) -> str:
    """A header's text, redacted and then bounded; "" when it is not text."""
    return bounded_text(value, limit) if isinstance(value, str) else ""


def safe_id(value: Any) -> str:
    """A message id from an untrusted header, or "" when it is not a valid one."""
    try:
        return validate_message_id(value)
    except Exception:
        return ""


def safe_letter_id(value: Any) -> str:
    """A letter id from an untrusted property, or a fresh one when it is not fit to show."""
    if isinstance(value, str) and 0 < len(value) <= 64 and value.isprintable():
        return value
    return uuid.uuid4().hex


def replay_count(headers: dict[str, Any]) -> int:
    """How often the message was replayed, from its header (0 when absent or not a count)."""
    value = headers.get(REPLAY_HEADER)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
