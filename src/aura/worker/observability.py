"""Moved to ``aura.messaging.observability`` (a user's own Celery app gets it too)."""

from aura.messaging.observability import install

__all__ = ["install"]
