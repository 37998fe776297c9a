"""Celery tasks of the IIoT vertical (queue ``iiot``): none yet.

Issue 19 adds them, thin over the domain modules: an ingestion file as a durable job, scheduled
scoring of every asset (Celery beat), alert notifications and retraining.
"""
