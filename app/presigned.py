"""Presigned multipart uploads in progress: one ``uploads`` row each, from their start to their
completion or abort (``app/routers/checkpoints.py``), and aborted in S3 when nobody completes
them in time (the maintenance loop, ``app/services.py``)."""

from __future__ import annotations

import logging

from sqlalchemy import delete, select

from app.db import Database, Upload, utcnow
from app.storage import S3Storage, Storage, StorageError

log = logging.getLogger("ligo.api")


def forget_upload(db: Database, upload_id: str) -> None:
    with db.write() as s:
        s.execute(delete(Upload).where(Upload.id == upload_id))


def expire_uploads(db: Database, storage: Storage) -> int:
    """Abort the presigned uploads nobody completed in time; how many there were."""
    if not isinstance(storage, S3Storage):
        return 0
    with db.read() as s:
        rows = s.scalars(select(Upload).where(Upload.expires_at < utcnow())).all()
    for row in rows:
        try:
            storage.abort_multipart(row.object_key, row.s3_upload_id)
            forget_upload(db, row.id)
        except StorageError as exc:
            log.warning("could not abort expired upload %s: %s", row.id, exc)
    return len(rows)
