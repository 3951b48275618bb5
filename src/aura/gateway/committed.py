"""What a write request committed to the outbox, and its publish after the commit.

The answer to a committed write is success whatever the publish does: what could not be
published or cleared is the relay's (``aura.gateway.relay``).
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from starlette.types import Scope

from aura.db import HELD, Claim, Staged
from aura.gateway.guard import release_slot
from aura.gateway.state import Gateway
from aura.logs import describe_exception

__all__ = ["Written", "publish_after_commit"]

_log = structlog.get_logger("aura.gateway")


@dataclass(frozen=True)
class Written:
    """What a request committed to the outbox: its claim, the message ids, and the
    messages themselves when few enough to publish from memory."""

    claim: Claim
    ids: list[str]
    staged: list[Staged] | None


async def publish_after_commit(gw: Gateway, written: Written, scope: Scope, *, origin: str) -> None:
    """Publish what was just committed. Never raises: the request's data is committed, so
    its answer is success; what could not be published or cleared is the relay's. A large
    import is published in the background, read back from the outbox a part at a time.
    The wait is bounded (``OutboxPublisher.publish``). While the publisher keeps up, the
    request gives its admission slot back before it waits for the broker; when it is
    congested the request keeps it, so admission slows new writes to the broker's pace."""
    if written.claim == HELD:  # the fair dispatcher's (aura.gateway.dispatch)
        release_slot(scope)
        gw.dispatcher.wake()
        return
    if not gw.outbox.congested:
        release_slot(scope)
    try:
        if written.staged is None:
            gw.outbox.publish_later(written.ids, written.claim, origin=origin)
        else:
            await gw.outbox.publish(written.staged, written.claim, origin=origin)
    except Exception as exc:
        _log.warning(
            "publishing after the commit failed; the outbox relay will send what is left",
            origin=origin,
            messages=len(written.ids),
            error=describe_exception(exc),
        )
