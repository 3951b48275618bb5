"""The intelligence worker: the Celery app (``aura.worker.celery_app``) and its tasks."""

__all__ = []
