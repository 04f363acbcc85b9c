"""The Celery application: grow tasks on the ``gpu`` queue, one long job per GPU.

Start a GPU worker with::

    celery -A worker.celery_app worker -Q gpu -c 1 --loglevel INFO

This module and everything it imports stay free of torch: the worker's parent process forks
a fresh child per task (``worker_max_tasks_per_child=1``) and only that child loads
ligo_core, so CUDA is never initialised before a fork.
"""

from __future__ import annotations

from celery import Celery
from celery.signals import celeryd_init

from app import scratch
from app.settings import Settings, get_settings

GROW_TASK = "ligo.grow"


def make_celery(settings: Settings) -> Celery:
    app = Celery("ligo", broker=settings.resolved_broker_url, include=["worker.tasks"])
    transport = {"visibility_timeout": settings.visibility_timeout_seconds}
    if settings.resolved_broker_url.startswith("filesystem://"):
        folder = settings.broker_dir
        transport = {"data_folder_in": str(folder / "queue"), "data_folder_out": str(folder / "queue"),
                     "processed_folder": str(folder / "processed"), "control_folder": str(folder / "control"),
                     "store_processed": False, "polling_interval": 0.5}
    app.conf.update(
        task_routes={GROW_TASK: {"queue": settings.gpu_queue}},
        task_default_queue="default",
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        # Long GPU jobs: one at a time per worker, acknowledged when done, redelivered if the
        # worker process is lost, a fresh process per job, and a hard time limit.
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_max_tasks_per_child=1,
        worker_concurrency=1,
        task_time_limit=settings.job_time_limit_seconds + 120,
        task_soft_time_limit=settings.job_time_limit_seconds + 60,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


def ensure_broker_folders(settings: Settings) -> None:
    """The filesystem broker's folders must exist before anyone publishes or consumes."""
    if settings.resolved_broker_url.startswith("filesystem://"):
        settings.make_data_dir()  # private, even when the worker starts before the API
        for sub in ("queue", "processed", "control"):
            (settings.broker_dir / sub).mkdir(parents=True, exist_ok=True)


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


celery = make_celery(get_settings())
app = celery  # `celery -A worker.celery_app` finds either name
