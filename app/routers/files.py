"""Downloads from the local storage backend through HMAC-signed, expiring links."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.problems import Problem
from app.services import Svc
from app.storage import LocalStorage, StorageError, verify_token

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.get("/{token}", response_class=FileResponse, responses={
    403: {"description": "The link is invalid or has expired"}, 404: {"description": "The object is gone"}})
def download(token: str, svc: Svc):
    """One object; the link itself is the credential (like a presigned S3 URL)."""
    if not isinstance(svc.storage, LocalStorage):
        raise Problem(404, "not-found", "downloads come from presigned S3 URLs with this storage backend")
    try:
        key, filename = verify_token(svc.storage.secret, token)
    except StorageError as exc:
        raise Problem(403, "link-invalid", str(exc)) from None
    path = svc.storage.path_of(key)
    if not path.is_file():
        raise Problem(404, "not-found", "the file no longer exists")
    return FileResponse(path, filename=filename, media_type="application/octet-stream",
                        headers={"Cache-Control": "private, max-age=0, no-store"})
