"""Checkpoints: streamed upload, presigned multipart upload to S3, registration of an S3 object.

Every path ends the same way: the bytes are checked by ``ligo_core.inspect_checkpoint`` (in
the validator process) before a row exists, and whatever was stored is removed when they
are refused, so a 4xx leaves no row and no object behind.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Query, Request, Response
from sqlalchemy import select

from app import limits, presigned, uploads
from app.auth import CurrentTenant
from app.db import Checkpoint, Upload, new_id, utcnow
from app.problems import Problem, field_problem, not_found
from app.schemas import (
    CheckpointList,
    CheckpointOut,
    CompletedPart,
    RegisterIn,
    UploadComplete,
    UploadCreate,
    UploadOut,
    UploadPart,
    checkpoint_json,
    iso,
)
from app.services import Services, Svc
from app.storage import S3_MAX_PARTS, S3_MIN_PART, S3Storage, StorageError, file_sha256, parse_s3_uri
from app.validator import ValidationFailed, ValidatorUnavailable

log = logging.getLogger("ligo.api")
router = APIRouter(prefix="/v1/checkpoints", tags=["checkpoints"])

ARCHIVES = (".tar", ".tar.gz", ".tgz", ".zip")
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
FLUSH_BYTES = 2**20
ERRORS = {401: {"description": "No or wrong API key"}, 413: {"description": "Over the size cap"},
          422: {"description": "Not a checkpoint the service can grow; `detail` says why"}}


def clean_filename(filename: str, field: str = "filename") -> tuple[str, str]:
    """(safe name, kind) where kind is 'archive' or 'safetensors'."""
    name = SAFE_NAME.sub("_", filename.replace("\\", "/").rsplit("/", 1)[-1]).strip("._") or ""
    lower = name.lower()
    if lower.endswith(ARCHIVES):
        return name, "archive"
    if lower.endswith(".safetensors"):
        return name, "safetensors"
    raise field_problem(field, f"{filename!r}: give a .tar, .tar.gz, .tgz or .zip of a Hugging Face model "
                               "directory, or a .safetensors file with its config")


def decode_config_header(value: str | None) -> dict:
    if not value:
        raise field_problem("X-Ligo-Config", "a .safetensors upload needs its config.json as base64 JSON "
                                             "in the X-Ligo-Config header")
    try:
        config = json.loads(base64.b64decode(value, validate=False))
    except (binascii.Error, ValueError):
        raise field_problem("X-Ligo-Config", "X-Ligo-Config is not base64-encoded JSON") from None
    return check_config(config, "X-Ligo-Config")


def check_config(config, field: str) -> dict:
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise field_problem(field, "the config must be a JSON object with a model_type")
    limits.check_sizes(config, field)
    return config


def _checkpoint_dir(tmp: Path, weights: Path, config: dict) -> Path:
    """A model directory (config.json + model.safetensors) around a bare weights file."""
    d = Path(tempfile.mkdtemp(dir=tmp, prefix="ckpt-"))
    (d / "config.json").write_text(json.dumps(config))
    try:  # a hard link, not a symlink: the reader refuses any file that resolves outside the folder
        os.link(weights, d / "model.safetensors")
    except OSError:  # another file system: a copy
        shutil.copyfile(weights, d / "model.safetensors")
    return d


async def inspect(svc: Services, path: Path, kind: str, config: dict | None) -> dict:
    tmp = svc.settings.resolved_tmp_dir
    tmp.mkdir(parents=True, exist_ok=True)
    target = _checkpoint_dir(tmp, path, config) if kind == "safetensors" else path
    try:
        return await svc.validator.inspect(target)
    except ValidationFailed as exc:
        errors = [{"field": exc.field, "message": str(exc)}] if exc.field else None
        raise Problem(422, "checkpoint-invalid", str(exc), title="Checkpoint not accepted", errors=errors) from None
    except ValidatorUnavailable as exc:
        raise Problem(503, "validator-unavailable", str(exc)) from None
    finally:
        if target != path:
            shutil.rmtree(target, ignore_errors=True)


def _row(ckpt_id: str, tenant: str, filename: str, size: int, sha256: str, info: dict, *, layout: str,
         object_key: str, external: bool = False) -> Checkpoint:
    return Checkpoint(
        id=ckpt_id, tenant=tenant, filename=filename, size_bytes=size, sha256=sha256, family=info["family"],
        model_type=info["model_type"], config=info["config"], num_parameters=int(info["num_parameters"]),
        has_tokenizer=bool(info.get("has_tokenizer")), layout=layout, object_key=object_key, external=external,
    )


def _save_row(svc: Services, row: Checkpoint, cleanup) -> Checkpoint:
    try:
        with svc.db.write() as s:
            s.add(row)
    except Exception:
        cleanup()
        raise
    return row


def _checkpoint_out(row: Checkpoint) -> CheckpointOut:
    return CheckpointOut.model_validate(checkpoint_json(row))


def _created(row: Checkpoint, response: Response) -> CheckpointOut:
    response.headers["Location"] = f"/v1/checkpoints/{row.id}"
    return _checkpoint_out(row)


@router.post("", status_code=201, response_model=CheckpointOut, responses=ERRORS,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                 "multipart/form-data": {"schema": {"type": "object", "required": [uploads.FILE_FIELD], "properties": {
                     uploads.FILE_FIELD: {"type": "string", "format": "binary"}}}}}}})
async def upload_checkpoint(
    request: Request,
    response: Response,
    tenant: CurrentTenant,
    svc: Svc,
    x_ligo_config: Annotated[str | None, Header(max_length=65_536, description="base64 config.json, for a .safetensors upload")] = None,
    filename: Annotated[str | None, Query(min_length=1, max_length=255, description=(
        "model.tar.gz, model.zip, ... or model.safetensors (default for a form: its file's name)"))] = None,
) -> CheckpointOut:
    """Stream the raw request body, or a form's `file` part, to storage (sha256 and size cap on the
    way), then check it."""
    body = await uploads.upload_body(request)
    name, kind = clean_filename(uploads.filename_of(filename, body))
    config = decode_config_header(x_ligo_config) if kind == "safetensors" else None
    cap = svc.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise Problem(413, "too-large", f"the upload is {int(declared)} bytes; the limit is {cap} bytes")
    ckpt_id = new_id()
    prefix = f"checkpoints/{ckpt_id}/"
    key = prefix + (name if kind == "archive" else "model.safetensors")
    writer = await anyio.to_thread.run_sync(svc.storage.open_writer, key)
    sha, size, pending, pending_size = hashlib.sha256(), 0, [], 0

    def write(data: bytes) -> None:
        sha.update(data)
        writer.write(data)

    committed = False
    try:
        async for chunk in body.chunks:
            size += len(chunk)
            if size > cap:
                raise Problem(413, "too-large", f"the upload is over the limit of {cap} bytes")
            pending.append(chunk)
            pending_size += len(chunk)
            if pending_size >= FLUSH_BYTES:
                data = b"".join(pending)
                pending.clear()
                pending_size = 0
                await anyio.to_thread.run_sync(write, data)
        if pending:
            await anyio.to_thread.run_sync(write, b"".join(pending))
        if size == 0:
            raise field_problem(body.field, body.empty_message)
        writer.finish()
        info = await inspect(svc, writer.local_path, kind, config)
        await anyio.to_thread.run_sync(writer.commit)
        committed = True
        if config is not None:
            await anyio.to_thread.run_sync(svc.storage.put_bytes, prefix + "config.json", json.dumps(config).encode())
        row = _row(ckpt_id, tenant, name, size, sha.hexdigest(), info,
                   layout="archive" if kind == "archive" else "directory",
                   object_key=key if kind == "archive" else prefix)
        row = await anyio.to_thread.run_sync(_save_row, svc, row, lambda: svc.storage.delete_prefix(prefix))
    except BaseException:
        with contextlib.suppress(Exception):
            if committed:
                await anyio.to_thread.run_sync(svc.storage.delete_prefix, prefix)
            else:
                await anyio.to_thread.run_sync(writer.abort)
        raise
    return _created(row, response)


# --- presigned multipart upload (S3) -----------------------------------------------------------

def _s3(svc: Services, what: str) -> S3Storage:
    """The S3 store; on local storage these endpoints do not exist (404, and not in the OpenAPI)."""
    if not isinstance(svc.storage, S3Storage):
        raise Problem(404, "needs-s3", f"{what} needs the S3 storage backend (LIGO_STORAGE_BACKEND=s3); "
                                       "use POST /v1/checkpoints with the file as the body")
    return svc.storage


@router.post("/uploads", status_code=201, response_model=UploadOut, responses=ERRORS)
def create_upload(body: UploadCreate, tenant: CurrentTenant, svc: Svc) -> UploadOut:
    """Start a multipart upload straight to S3: PUT each part to its URL, then call .../complete."""
    s3 = _s3(svc, "a presigned upload")
    name, kind = clean_filename(body.filename)
    config = check_config(body.config, "config") if kind == "safetensors" else None
    if kind == "safetensors" and config is None:
        raise field_problem("config", "a .safetensors upload needs its config.json in `config`")
    cap = svc.settings.presigned_max_bytes
    if body.size_bytes > cap:
        raise Problem(413, "too-large", f"{body.size_bytes} bytes is over the limit of {cap} bytes")
    part_size = max(S3_MIN_PART, svc.settings.s3_part_size_bytes, math.ceil(body.size_bytes / S3_MAX_PARTS))
    upload_id = new_id()
    key = f"checkpoints/{upload_id}/" + (name if kind == "archive" else "model.safetensors")
    ttl = svc.settings.upload_ttl_seconds
    s3_upload = s3.create_multipart(key)
    row = Upload(id=upload_id, tenant=tenant, filename=name, object_key=key, s3_upload_id=s3_upload,
                 size_bytes=body.size_bytes, part_size=part_size, config=config,
                 expires_at=utcnow() + timedelta(seconds=ttl))
    try:
        with svc.db.write() as s:
            s.add(row)
    except Exception:
        s3.abort_multipart(key, s3_upload)
        raise
    return _upload_out(s3, row, ttl)


def _upload_out(s3: S3Storage, row: Upload, ttl: int, uploaded: list[tuple[int, str]] = ()) -> UploadOut:
    """The upload with a URL for every part, each valid ``ttl`` seconds (until the upload expires)."""
    count = math.ceil(row.size_bytes / row.part_size)
    parts = [UploadPart(part_number=n, url=s3.presign_part(row.object_key, row.s3_upload_id, n, ttl))
             for n in range(1, count + 1)]
    return UploadOut(id=row.id, filename=row.filename, size_bytes=row.size_bytes, part_size=row.part_size,
                     parts=parts, expires_at=iso(row.expires_at),
                     uploaded=[CompletedPart(part_number=n, etag=etag) for n, etag in uploaded])


@router.get("/uploads/{upload_id}", response_model=UploadOut, responses={
    401: ERRORS[401], 404: {"description": "No such upload (or not this tenant's)"},
    410: {"description": "The upload expired; start a new one"}, 502: {"description": "S3 could not list the parts"}})
def resume_upload(upload_id: str, tenant: CurrentTenant, svc: Svc) -> UploadOut:
    """An upload in progress, to resume it: fresh part URLs (valid until the upload expires) and
    the parts S3 already holds. PUT the others, then call .../complete with all of them."""
    s3 = _s3(svc, "a presigned upload")
    row = _upload_of(svc, tenant, upload_id)
    left = int((row.expires_at - utcnow()).total_seconds())
    if left <= 0:
        raise Problem(410, "expired", f"upload {upload_id} expired at {iso(row.expires_at)}; start a new one")
    try:
        uploaded = s3.uploaded_parts(row.object_key, row.s3_upload_id)
    except StorageError as exc:
        raise Problem(502, "storage", str(exc)) from None
    return _upload_out(s3, row, left, uploaded)


def _upload_of(svc: Services, tenant: str, upload_id: str) -> Upload:
    with svc.db.read() as s:
        row = s.get(Upload, upload_id)
    if row is None or row.tenant != tenant:
        raise not_found("upload", upload_id)
    return row


def _download_hashed(fetch, dest: Path) -> tuple[int, str]:
    fetch(dest)
    return file_sha256(dest)


@router.post("/uploads/{upload_id}/complete", status_code=201, response_model=CheckpointOut, responses=ERRORS)
async def complete_upload(upload_id: str, body: UploadComplete, tenant: CurrentTenant, svc: Svc,
                          response: Response) -> CheckpointOut:
    """Finish the multipart upload, check the object, and create the checkpoint."""
    s3 = _s3(svc, "a presigned upload")
    row = await anyio.to_thread.run_sync(_upload_of, svc, tenant, upload_id)
    parts = sorted((p.part_number, p.etag) for p in body.parts)
    prefix = f"checkpoints/{row.id}/"
    tmp = Path(tempfile.mkdtemp(dir=_tmp(svc), prefix="upload-"))
    try:
        try:
            await anyio.to_thread.run_sync(s3.complete_multipart, row.object_key, row.s3_upload_id, parts)
        except StorageError as exc:
            raise field_problem("parts", str(exc)) from None
        await anyio.to_thread.run_sync(presigned.forget_upload, svc.db, row.id)
        try:
            local = tmp / row.filename
            size, sha = await anyio.to_thread.run_sync(_download_hashed,
                                                       lambda d: s3.download(row.object_key, d), local)
            if size != row.size_bytes:
                raise field_problem("parts", f"the parts add up to {size} bytes, not the {row.size_bytes} announced")
            kind = "safetensors" if row.filename.lower().endswith(".safetensors") else "archive"
            info = await inspect(svc, local, kind, row.config)
            if row.config is not None:
                await anyio.to_thread.run_sync(s3.put_bytes, prefix + "config.json", json.dumps(row.config).encode())
            ckpt = _row(row.id, tenant, row.filename, size, sha, info,
                        layout="archive" if kind == "archive" else "directory",
                        object_key=row.object_key if kind == "archive" else prefix)
            ckpt = await anyio.to_thread.run_sync(_save_row, svc, ckpt, lambda: None)
        except BaseException:
            with contextlib.suppress(Exception):
                await anyio.to_thread.run_sync(s3.delete_prefix, prefix)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _created(ckpt, response)


@router.delete("/uploads/{upload_id}", status_code=204, responses={404: {"description": "No such upload"}})
def abort_upload(upload_id: str, tenant: CurrentTenant, svc: Svc):
    s3 = _s3(svc, "a presigned upload")
    row = _upload_of(svc, tenant, upload_id)
    s3.abort_multipart(row.object_key, row.s3_upload_id)
    presigned.forget_upload(svc.db, row.id)


# --- registering an existing object ------------------------------------------------------------

OWN_PREFIXES = ("checkpoints/", "jobs/")


def check_external_uri(svc: Services, uri: str, field: str) -> tuple[str, str]:
    """(bucket, key) of an s3:// URI a tenant may point the service at.

    Objects the service itself wrote (other tenants' checkpoints and results) are refused,
    and so are buckets other than the service's own unless listed in LIGO_S3_REGISTER_BUCKETS.
    """
    s3 = svc.storage
    if not isinstance(s3, S3Storage):
        raise field_problem(field, "s3:// URIs need the S3 storage backend (LIGO_STORAGE_BACKEND=s3)")
    try:
        bucket, key = parse_s3_uri(uri)
    except StorageError as exc:
        raise field_problem(field, str(exc)) from None
    if bucket == s3.bucket:
        inside = key[len(s3.prefix):] if key.startswith(s3.prefix) else None
        if inside is not None and inside.startswith(OWN_PREFIXES):
            raise field_problem(field, f"{uri} is inside the service's own storage; upload the file instead")
    elif bucket not in svc.settings.s3_register_buckets:
        raise field_problem(field, f"bucket {bucket!r} is not one the service may read "
                                   "(LIGO_S3_REGISTER_BUCKETS)")
    return bucket, key


def _tmp(svc: Services) -> Path:
    d = svc.settings.resolved_tmp_dir
    d.mkdir(parents=True, exist_ok=True)
    return d


@router.post("/register", status_code=201, response_model=CheckpointOut, responses=ERRORS)
async def register_checkpoint(body: RegisterIn, tenant: CurrentTenant, svc: Svc,
                              response: Response) -> CheckpointOut:
    """Create a checkpoint from an archive already in S3 (read in place, never modified)."""
    _s3(svc, "registering an object")
    bucket, key = check_external_uri(svc, body.uri, "uri")
    name, kind = clean_filename(key, "uri")
    if kind != "archive":
        raise field_problem("uri", "register a .tar, .tar.gz, .tgz or .zip archive of a model directory")
    s3: S3Storage = svc.storage
    try:
        size = await anyio.to_thread.run_sync(s3.head_uri, bucket, key)
    except StorageError as exc:
        raise field_problem("uri", f"cannot read {body.uri}: {exc}") from None
    if size > svc.settings.presigned_max_bytes:
        raise Problem(413, "too-large", f"{body.uri} is {size} bytes; the limit is {svc.settings.presigned_max_bytes}")
    tmp = Path(tempfile.mkdtemp(dir=_tmp(svc), prefix="register-"))
    try:
        local = tmp / name
        size, sha = await anyio.to_thread.run_sync(_download_hashed, lambda d: s3.download_uri(bucket, key, d), local)
        info = await inspect(svc, local, kind, None)
        row = _row(new_id(), tenant, name, size, sha, info, layout="archive", object_key=body.uri, external=True)
        row = await anyio.to_thread.run_sync(_save_row, svc, row, lambda: None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _created(row, response)


def _read_checkpoint(svc: Services, checkpoint_id: str) -> Checkpoint | None:
    with svc.db.read() as s:
        return s.get(Checkpoint, checkpoint_id)


def _find_checkpoints(svc: Services, tenant: str, sha256: str | None, limit: int) -> list[Checkpoint]:
    query = select(Checkpoint).where(Checkpoint.tenant == tenant)
    if sha256 is not None:
        query = query.where(Checkpoint.sha256 == sha256)
    with svc.db.read() as s:
        return s.scalars(query.order_by(Checkpoint.id.desc()).limit(limit)).all()


@router.get("", response_model=CheckpointList, responses={401: {"description": "No or wrong API key"}})
async def list_checkpoints(
    tenant: CurrentTenant, svc: Svc,
    sha256: Annotated[str | None, Query(pattern="^[0-9a-f]{64}$", description=(
        "Only the checkpoints made from a file with this SHA-256 (lowercase hex): a pipeline that "
        "re-runs a step finds the upload it made before instead of sending the bytes again."))] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> CheckpointList:
    """The tenant's checkpoints, newest first."""
    rows = await svc.db.call(_find_checkpoints, svc, tenant, sha256, limit)
    return CheckpointList(items=[_checkpoint_out(r) for r in rows])


@router.get("/{checkpoint_id}", response_model=CheckpointOut, responses={404: {"description": "No such checkpoint"}})
async def get_checkpoint(checkpoint_id: str, tenant: CurrentTenant, svc: Svc) -> CheckpointOut:
    row = await svc.db.call(_read_checkpoint, svc, checkpoint_id)
    if row is None or row.tenant != tenant:
        raise not_found("checkpoint", checkpoint_id)
    return _checkpoint_out(row)


S3_ONLY = (create_upload, resume_upload, complete_upload, abort_upload, register_checkpoint)  # left out of local storage's OpenAPI
