"""Aura: a resilience layer for Celery workers on RabbitMQ, PostgreSQL, Redis and LLM APIs.

Public surfaces live in the subpackages (``aura.config``, ``aura.errors``, ``aura.metrics``,
``aura.events``, ``aura.logs``; ``aura.db``, ``aura.llm``, ``aura.messaging`` as they land).
The Prometheus instrumentation hook (``aura.metrics``) is installed by the first event
emitted (``aura.events.emit``) or when ``aura.metrics`` is imported, not by importing
``aura``: the ``aura`` command's help loads neither prometheus_client nor structlog.
"""

from aura.process_args import prepare_prefork_metrics

__all__ = ["__version__"]
__version__ = "0.1.0"

# A prefork worker's children count into files, which prometheus_client must know of
# before it is first imported (``aura.process_args``).
prepare_prefork_metrics()
