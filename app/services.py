"""What the API process holds: settings, database, storage, broker, validator; and its maintenance loop."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from app import store
from app.auth import Authenticator
from app.db import Database
from app.sealing import seal_plaintext
from app.settings import Settings
from app.storage import Storage, make_storage
from app.validator import Validator
from app.webhooks import WebhookSender

log = logging.getLogger("ligo.api")


class Dispatcher:
    """Sends job ids to the workers' queue; the job row, not the message, holds the job."""

    def __init__(self, settings: Settings, db: Database):
        from worker.celery_app import GROW_TASK, ensure_broker_folders, make_celery

        ensure_broker_folders(settings)
        self.settings, self.db = settings, db
        self.celery = make_celery(settings)
        self.task = GROW_TASK

    def dispatch(self, job_id: str) -> bool:
        try:
            self.celery.send_task(self.task, args=[job_id], queue=self.settings.gpu_queue,
                                  retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2})
        except Exception as exc:  # broker down: the maintenance loop sends it later
            log.warning("could not send job %s to the broker: %s", job_id, exc)
            return False
        store.mark_dispatched(self.db, job_id)
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


@dataclass
class Services:
    settings: Settings
    db: Database
    storage: Storage
    dispatcher: Dispatcher
    validator: Validator
    auth: Authenticator
    webhooks: WebhookSender
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @classmethod
    def build(cls, settings: Settings) -> Services:
        settings.make_data_dir()
        key = settings.signing_key()
        db = Database(settings.resolved_database_url, key)
        if settings.auto_migrate:
            from app.migrate import upgrade

            upgrade(settings.resolved_database_url, secret_key=key)
        with db.engine.begin() as conn:  # secrets written since by a tool without the key
            seal_plaintext(conn, db.fernet)
        return cls(
            settings=settings, db=db, storage=make_storage(settings), dispatcher=Dispatcher(settings, db),
            validator=Validator(settings.validator_processes, settings.validate_timeout_seconds,
                                settings.resolved_tmp_dir / "validate", settings.resolved_max_extract_bytes,
                                [settings.data_dir.resolve(), settings.resolved_storage_dir]),
            auth=Authenticator(db, settings.auth_cache_seconds), webhooks=WebhookSender(db, settings),
        )

    # --- maintenance: leases, lost dispatches, webhooks, stale uploads ---------------------

    def maintain_once(self) -> None:
        for job_id in store.requeue_expired(self.db, self.settings.max_attempts):
            log.warning("job %s lost its worker; queued again", job_id)
            self.dispatcher.dispatch(job_id)
        for job_id in store.undispatched(self.db, self.settings.redispatch_after_seconds):
            self.dispatcher.dispatch(job_id)
        self.webhooks.deliver_due()
        from app.routers.checkpoints import expire_uploads

        expire_uploads(self)

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.maintenance_interval_seconds):
            try:
                self.maintain_once()
            except Exception:
                log.exception("maintenance pass failed")

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="ligo-maintenance", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        await self.validator.close()
        self.webhooks.close()
        self.dispatcher.close()
        self.db.dispose()


async def services(request: Request) -> Services:
    return request.app.state.services


Svc = Annotated[Services, Depends(services)]
