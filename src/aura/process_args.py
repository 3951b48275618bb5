"""What a worker's command line says, read before anything else is imported.

Two things need it that early:

    pool_on_the_command_line   the pool a ``celery ... worker`` names with ``-P``/``--pool``
                               (Celery cannot tell ``-P prefork`` from its own default when
                               an app configures ``worker_pool``: ``aura.messaging.configure``
                               lets the command line win)
    prepare_prefork_metrics    under a prefork worker, a directory for prometheus_client's
                               multiprocess mode, set before prometheus_client is imported
                               (it picks its mode at import): the children's counts reach
                               the worker's /metrics with nothing set by the user

Nothing here imports more than the standard library: ``aura`` calls it on import.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import MutableMapping, Sequence

__all__ = ["pool_on_the_command_line", "prepare_prefork_metrics"]

MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def pool_on_the_command_line(argv: Sequence[str]) -> str | None:
    """The pool a ``... worker`` command line names (``-P X``, ``-PX``, ``--pool X``,
    ``--pool=X``), if any."""
    if "worker" not in argv:
        return None
    for index, argument in enumerate(argv):
        if argument in ("-P", "--pool") and index + 1 < len(argv):
            return argv[index + 1]
        if argument.startswith("--pool="):
            return argument.split("=", 1)[1]
        if argument.startswith("-P") and len(argument) > 2:
            return argument[2:]
    return None


def prepare_prefork_metrics(
    argv: Sequence[str] | None = None,
    environ: MutableMapping[str, str] | None = None,
    *,
    imported: frozenset[str] | None = None,
) -> str | None:
    """Under a prefork worker (``-P prefork``, or ``WORKER_POOL=prefork`` and no ``-P``)
    with no PROMETHEUS_MULTIPROC_DIR and prometheus_client not imported yet: a fresh
    directory, set as PROMETHEUS_MULTIPROC_DIR; which one, or None. The worker empties it
    at start (``aura.messaging._observability``)."""
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    loaded = frozenset(sys.modules) if imported is None else imported
    if MULTIPROC_VARIABLE in environ or "prometheus_client" in loaded or "worker" not in argv:
        return None
    pool = pool_on_the_command_line(argv) or environ.get("WORKER_POOL", "async")
    if pool != "prefork":
        return None
    directory = tempfile.mkdtemp(prefix="aura-prefork-metrics-")
    environ[MULTIPROC_VARIABLE] = directory
    return directory
