"""The platform's task contract: the names the gateway publishes to and the worker
registers under, the queues they travel on and their arguments' order. Owned by neither
side (both import it, and it imports nothing of Aura), so the worker does not import the
gateway and the gateway does not import the worker.

    INGEST_TASK   aura.ingest_product   (record, tenant_id), import_id= on bulk_queue
    ENRICH_TASK   aura.enrich_product   (product_id, tenant_id) on realtime_queue

A name is part of every message already queued: renaming one strands those messages
(the envelope guard dead-letters them as ``malformed_message``: unknown task).
"""

from __future__ import annotations

__all__ = [
    "APP_NAME",
    "BULK_QUEUE",
    "ENRICH_TASK",
    "INGEST_TASK",
    "MAX_RECORD_BYTES",
    "PLATFORM_QUEUES",
    "REALTIME_QUEUE",
]

APP_NAME = "aura"
"""The platform's Celery app (the worker's, and the gateway's publisher)."""
INGEST_TASK = "aura.ingest_product"
ENRICH_TASK = "aura.enrich_product"
REALTIME_QUEUE = "realtime_queue"
"""Interactive work (enrichment); also ``aura.messaging.configure``'s default queue."""
BULK_QUEUE = "bulk_queue"
"""Batch work (catalog imports)."""
PLATFORM_QUEUES = (REALTIME_QUEUE, BULK_QUEUE)
"""The platform's work queues, the one it prefers first (``aura.messaging.pool``)."""
MAX_RECORD_BYTES = 256 * 1024
"""The largest product record the gateway takes (one product body, one import record);
``aura dlq replay`` refuses an ingest letter whose record is larger."""
