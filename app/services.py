"""What the API process holds: settings, database, storage, broker, validator; and its maintenance loop."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from app import lifecycle, presigned
from app.auth import Authenticator
from app.broker import Dispatcher
from app.db import Database
from app.sealing import seal_plaintext
from app.settings import Settings
from app.storage import Storage, make_storage
from app.validator import Validator
from app.webhooks import WebhookSender

log = logging.getLogger("ligo.api")


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
        for job_id in lifecycle.requeue_expired(self.db, self.settings.max_attempts):
            log.warning("job %s lost its worker; queued again", job_id)
            self.dispatcher.dispatch(job_id)
        for job_id in lifecycle.undispatched(self.db, self.settings.redispatch_after_seconds):
            self.dispatcher.dispatch(job_id)
        self.webhooks.deliver_due()
        presigned.expire_uploads(self.db, self.storage)

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
