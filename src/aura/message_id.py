"""Message ids: what one looks like, checked wherever one is used as a key.

A message id keys the inbox (``processed_messages``) and the retry counter
(``retry_count:{message_id}``); Celery's are UUIDs. Anything else that is short and made
of safe characters is accepted, so an id can never smuggle a Redis glob or a newline.
"""

from __future__ import annotations

import re

from aura.errors import InvalidInputError

__all__ = ["MESSAGE_ID_MAX_LENGTH", "validate_message_id"]

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
