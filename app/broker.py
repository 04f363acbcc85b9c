"""The Celery application as the API sees it, and the dispatcher that sends jobs to the workers.

The API enqueues grow tasks by name (``send_task``) and never imports the worker package;
the worker (``worker/celery_app.py``) builds its Celery application from the same
``make_celery``, so both sides agree on routing, serialisation and broker settings. Nothing
here loads torch.
"""

from __future__ import annotations

import logging

from celery import Celery

from app import lifecycle
from app.db import Database
from app.settings import Settings

log = logging.getLogger("ligo.api")

GROW_TASK = "ligo.grow"


def make_celery(settings: Settings, include: tuple[str, ...] = ()) -> Celery:
    """``include``: the task modules a worker imports at start (the API sends by name, needs none)."""
    app = Celery("ligo", broker=settings.resolved_broker_url, include=list(include))
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


class Dispatcher:
    """Sends job ids to the workers' queue; the job row, not the message, holds the job."""

    def __init__(self, settings: Settings, db: Database):
        ensure_broker_folders(settings)
        self.settings, self.db = settings, db
        self.celery = make_celery(settings)

    def dispatch(self, job_id: str) -> bool:
        try:
            self.celery.send_task(GROW_TASK, args=[job_id], queue=self.settings.gpu_queue,
                                  retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2})
        except Exception as exc:  # broker down: the maintenance loop sends it later
            log.warning("could not send job %s to the broker: %s", job_id, exc)
            return False
        lifecycle.mark_dispatched(self.db, job_id)
        return True

    def check(self) -> None:
        with self.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)

    def queue_depth(self) -> int | None:
        """Messages waiting in the gpu queue (Redis only; None when the broker cannot say)."""
        url = self.settings.resolved_broker_url
        if not url.startswith(("redis://", "rediss://")):
            return None
        try:
            with self.celery.connection_for_read() as conn:
                return int(conn.default_channel.client.llen(self.settings.gpu_queue))
        except Exception:
            return None

    def close(self) -> None:
        self.celery.close()
