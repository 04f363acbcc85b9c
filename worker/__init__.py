"""Celery workers for the growth service: thin glue between the queue, the job store and ligo_core."""
