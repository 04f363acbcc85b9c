"""Celery tasks. The message carries only a job id; the job row says what to do."""

from __future__ import annotations

import logging

from app.broker import GROW_TASK
from app.settings import get_settings
from worker.celery_app import celery

log = logging.getLogger("ligo.worker")


@celery.task(name=GROW_TASK, acks_late=True, reject_on_worker_lost=True)
def grow(job_id: str) -> str:
    """Run one growth job. Safe to deliver twice: only a queued job is claimed."""
    from ligo_core.allocator import keep_freed_memory
    from worker.runner import JobRunner  # in the per-job child process, never the parent

    keep_freed_memory()  # the child runs this one job and exits: reused memory, fewer page faults
    return JobRunner(get_settings()).run(job_id)
