"""The Celery application: grow tasks on the ``gpu`` queue, one long job per GPU.

Start a GPU worker with::

    celery -A worker.celery_app worker -Q gpu -c 1 --loglevel INFO

This module and everything it imports stay free of torch: the worker's parent process forks
a fresh child per task (``worker_max_tasks_per_child=1``) and only that child loads
ligo_core, so CUDA is never initialised before a fork. The settings are the API's own
(``app/broker.py``), which sends the tasks by name.
"""

from __future__ import annotations

from celery.signals import celeryd_init

from app import scratch
from app.broker import ensure_broker_folders, make_celery
from app.settings import Settings, get_settings


def sweep_scratch(settings: Settings) -> list[str]:
    """Remove the scratch folders (``job-*``, and extractions) of job attempts that died: their
    locks are free (app.scratch); a live job's folder on the same disk is left alone."""
    return scratch.sweep(settings.resolved_tmp_dir, ("job-", "ligo-src-"))


@celeryd_init.connect
def _worker_starting(**_kwargs) -> None:
    settings = get_settings()
    settings.make_data_dir()
    ensure_broker_folders(settings)
    sweep_scratch(settings)


celery = make_celery(get_settings(), include=("worker.tasks",))
app = celery  # `celery -A worker.celery_app` finds either name
