"""Where a delivery came from: its work queue, and whether the broker delayed it (kombu's
native delayed delivery routes through keys that start with 28 delay bits)."""

from __future__ import annotations

import re
from typing import Any

_DELAY_BITS = re.compile(r"(?:[01]\.){28}")  # kombu's native delayed delivery's prefix


def delayed_by_broker(delivery_info: dict[str, Any] | None) -> bool:
    """Whether this delivery came through kombu's native delayed delivery (its routing key
    starts with the 28 delay bits): the broker has already held it for its countdown."""
    return _DELAY_BITS.match(str((delivery_info or {}).get("routing_key", ""))) is not None


def queue_of(delivery_info: dict[str, Any] | None) -> str:
    """The work queue a delivery came from: its routing key, less the 28 delay bits a
    delayed retry's routing key starts with (a queue name may hold dots itself)."""
    routing_key = str((delivery_info or {}).get("routing_key", ""))
    found = _DELAY_BITS.match(routing_key)
    return routing_key[found.end() :] if found else routing_key
