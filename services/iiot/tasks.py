"""Celery tasks of the iiot failure prediction vertical (queue ``iiot``); none yet."""
