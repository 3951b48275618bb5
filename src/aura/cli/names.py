"""Key prefixes and bounds the commands show in their help, copied here so that building
the help loads neither Redis nor kombu (``tests/cli/test_cli_fast.py`` checks each copy
against its source)."""

from __future__ import annotations

__all__ = []

RETRY_PREFIX = "retry_count:"  # aura.messaging._retry.KEY_PREFIX
DEFER_PREFIX = "defer_count:"  # aura.messaging._task.DEFER_PREFIX
