"""Celery tasks of the emotion-aware customer service vertical (queue ``cs``); none yet."""
