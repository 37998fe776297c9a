"""Celery tasks of the fraud vertical (queue ``fraud``)."""
