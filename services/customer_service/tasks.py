"""Celery tasks of the customer-service vertical (queue ``cs``): none yet.

Issue 18 decides which work leaves the API process (e.g. building a call's summary once it ends);
the live pipeline itself runs in the API process beside the stream.
"""
