"""A small shop's Celery app of its own that takes Aura in as a library."""
