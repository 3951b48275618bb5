"""Message ids and fingerprints: what names a message, and what it carries.

A message id keys the inbox (``processed_messages``) and the retry counter
(``retry_count:{message_id}``); Celery's are UUIDs. Anything else that is short and made
of safe characters is accepted, so an id can never smuggle a Redis glob or a newline.

A fingerprint is the SHA-256 of a message's task name and arguments as canonical JSON
(sorted keys, no spaces): the inbox keeps it beside the id, so the same id with another
payload is told apart (``aura.messaging._idempotency``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from aura.errors import InvalidInputError

__all__ = ["MESSAGE_ID_MAX_LENGTH", "InboxEntry", "message_fingerprint", "validate_message_id"]

MESSAGE_ID_MAX_LENGTH = 255
_ALLOWED = re.compile(r"[A-Za-z0-9][A-Za-z0-9:._-]*")


def validate_message_id(message_id: object) -> str:
    """Return ``message_id`` if it is a valid id; raise ``InvalidInputError`` naming why."""
    if not isinstance(message_id, str):
        raise InvalidInputError(
            f"message id must be a string, got {type(message_id).__name__}", field="message_id"
        )
    if not 1 <= len(message_id) <= MESSAGE_ID_MAX_LENGTH:
        raise InvalidInputError(
            f"message id must be 1 to {MESSAGE_ID_MAX_LENGTH} characters, got {len(message_id)}",
            field="message_id",
        )
    if not _ALLOWED.fullmatch(message_id):
        raise InvalidInputError(
            "message id may hold only letters, digits and ':._-' (and start with a letter "
            f"or digit), got {message_id[:40]!r}",
            field="message_id",
        )
    return message_id


def message_fingerprint(task: str, args: Any, kwargs: Any) -> str:
    """SHA-256 (hex) of the task name and arguments as canonical JSON."""
    canonical = json.dumps(
        [task, list(args), dict(kwargs)],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        default=repr,
    )
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class InboxEntry:
    """A committed message: the fingerprint of the payload it was committed for (None
    for a row kept before fingerprints were, which matches any payload)."""

    fingerprint: str | None

    def matches(self, fingerprint: str) -> bool:
        return self.fingerprint is None or self.fingerprint == fingerprint
