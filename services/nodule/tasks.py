"""Celery tasks of the nodule vertical (queue ``nodule``): none yet.

Issue 17 adds them, thin over the domain modules: analysing a complete series as a durable job
(exactly once even if a worker dies) and sending results to the PACS with retries.
"""
