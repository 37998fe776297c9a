"""Celery tasks of the ct nodule detection with dicom fusion vertical (queue ``nodule``); none yet."""
