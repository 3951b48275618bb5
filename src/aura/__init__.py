"""Aura: a resilience layer for Celery workers on RabbitMQ, PostgreSQL, Redis and LLM APIs.

Public surfaces live in the subpackages (``aura.config``, ``aura.errors``, ``aura.metrics``,
``aura.events``, ``aura.logs``; ``aura.db``, ``aura.llm``, ``aura.messaging`` as they land).
Importing ``aura`` installs the Prometheus instrumentation hook.
"""

from aura import metrics as _metrics  # noqa: F401  (installs the Prometheus hook)

__all__ = ["__version__"]
__version__ = "0.1.0"
