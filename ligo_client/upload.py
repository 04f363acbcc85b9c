"""Getting a checkpoint to the service.

A directory is packed (``archive.py``); a file is sent as it is. When the service stores on S3
the file goes in presigned parts straight to S3 (``POST /v1/checkpoints/uploads``, a PUT per
part, ``.../complete``), and each part's ETag is written to a small state file as soon as S3
answers, so an upload cut mid-way resumes with the parts still missing. Otherwise (the service
answers the ``needs-s3`` problem) the file is streamed as the body of ``POST /v1/checkpoints``.
The same state file then remembers the checkpoint, so sending the same bytes again reuses it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote

from ligo_client.archive import hash_file, pack_directory, read_range
from ligo_client.errors import BadInput, HTTPProblem, LigoClientError, RequestRejected

FILE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip", ".safetensors")
UPLOAD_READ_TIMEOUT = 3600.0  # the service checks the checkpoint before it answers
EXPIRY_MARGIN = timedelta(minutes=5)  # a resumed part needs its presigned URL to last a little longer


@dataclass
class Source:
    path: Path
    filename: str
    sha256: str
    size: int
    config: dict | None
    packed: bool  # a temporary archive made from a directory


def prepare(path: str | os.PathLike, scratch: Path, emit) -> Source:
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise BadInput(f"{p}: no config.json; give a Hugging Face model directory")
        emit({"stage": "packing", "path": str(p)})
        archive, sha, size = pack_directory(p, scratch)
        name = "".join(c if c.isalnum() or c in "._-" else "_" for c in p.resolve().name).strip("._") or "model"
        return Source(archive, f"{name}.tar", sha, size, None, packed=True)
    if not p.is_file():
        raise BadInput(f"{p}: no such file or directory")
    if not p.name.lower().endswith(FILE_SUFFIXES):
        raise BadInput(f"{p}: give a model directory, a .tar, .tar.gz, .tgz or .zip of one, or a .safetensors file")
    config = None
    if p.name.lower().endswith(".safetensors"):
        config_path = p.parent / "config.json"
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as exc:
            raise BadInput(f"{p}: a bare .safetensors file needs its config.json beside it ({exc})") from None
    sha, size = hash_file(p)
    if size == 0:
        raise BadInput(f"{p}: the file is empty")
    return Source(p, p.name, sha, size, config, packed=False)


class UploadState:
    """One JSON file per (service, API key, file digest) in the cache directory, written atomically."""

    def __init__(self, directory: Path, server: str, api_key: str, sha256: str):
        key = hashlib.sha256(f"{server}\n{hashlib.sha256(api_key.encode()).hexdigest()}\n{sha256}".encode())
        self.path = directory / f"{key.hexdigest()[:40]}.json"

    def load(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def save(self, data: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def upload(client, path, scratch: Path, states: Path) -> dict:
    source = prepare(path, scratch, client.emit)
    try:
        state = UploadState(states, client.base_url, client.api_key, source.sha256)
        ckpt = _known_checkpoint(client, state, source)
        if ckpt is None:
            ckpt = _multipart(client, source, state) if client.presigned is not False else None
            if ckpt is None:
                ckpt = _stream(client, source)
            state.save({"checkpoint_id": ckpt["id"], "sha256": source.sha256, "size_bytes": source.size})
            client.emit({"stage": "uploaded", "checkpoint": ckpt, "reused": False})
        return ckpt
    finally:
        if source.packed:
            source.path.unlink(missing_ok=True)


def _known_checkpoint(client, state: UploadState, source: Source) -> dict | None:
    """The checkpoint made from these exact bytes earlier, if the service still has it: the one
    this machine remembers, or any of the tenant's with the same SHA-256 (a step retried on
    another machine finds the upload the first attempt made)."""
    ckpt_id = state.load().get("checkpoint_id")
    ckpt = None
    if isinstance(ckpt_id, str):
        try:
            ckpt = client.checkpoint(ckpt_id)
        except RequestRejected as exc:
            if exc.status != 404:
                raise
        if ckpt is None or ckpt.get("sha256") != source.sha256:
            state.clear()
            ckpt = None
    if ckpt is None:
        found = client.api("GET", "/v1/checkpoints", params={"sha256": source.sha256, "limit": 1}).json()["items"]
        ckpt = found[0] if found else None
    if ckpt is not None:
        client.emit({"stage": "uploaded", "checkpoint": ckpt, "reused": True})
    return ckpt


def _stream(client, source: Source) -> dict:
    sent = {"n": 0}

    def body():
        sent["n"] = 0
        return read_range(source.path, 0, source.size, lambda n: _progress(client, sent, n, source.size))

    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(source.size)}
    if source.config is not None:
        headers["X-Ligo-Config"] = base64.b64encode(json.dumps(source.config).encode()).decode()
    r = client.api("POST", "/v1/checkpoints", params={"filename": source.filename}, content=body, headers=headers,
                   timeout=client.timeout(read=UPLOAD_READ_TIMEOUT))
    return r.json()


def _progress(client, sent: dict, n: int, total: int) -> None:
    sent["n"] += n
    client.emit({"stage": "uploading", "sent": sent["n"], "total": total})


def _usable(saved: dict, source: Source) -> bool:
    upload = saved.get("upload") or {}
    try:
        expires = datetime.fromisoformat(str(upload["expires_at"]).replace("Z", "+00:00"))
        return (upload["size_bytes"] == source.size and int(upload["part_size"]) > 0 and bool(upload["parts"])
                and expires - EXPIRY_MARGIN > datetime.now(timezone.utc))
    except (KeyError, TypeError, ValueError):
        return False


def _multipart(client, source: Source, state: UploadState) -> dict | None:
    """The presigned multipart upload, resumed from the state file when one is there; None when
    the service does not offer it. A resumed upload the service or S3 no longer knows starts again."""
    saved = state.load().get("multipart") or {}
    if not _usable(saved, source):
        saved = {}
    while True:
        resumed = bool(saved)
        if not resumed:
            saved = _create(client, source)
            if saved is None:
                return None
            state.save({"multipart": saved})
        try:
            return _send_parts(client, source, state, saved, resumed)
        except RequestRejected as exc:
            if not resumed or exc.status not in (403, 404, 410):
                raise
            client.emit({"stage": "retrying", "what": "resuming the upload", "attempt": 1,
                         "reason": f"the saved upload is gone ({exc.status}); starting again", "delay": 0})
            state.clear()
            saved = {}


def _create(client, source: Source) -> dict | None:
    body = {"filename": source.filename, "size_bytes": source.size}
    if source.config is not None:
        body["config"] = source.config
    try:
        upload = client.api("POST", "/v1/checkpoints/uploads", json=body).json()
    except HTTPProblem as exc:
        if exc.kind == "needs-s3" or exc.status == 501:  # the service stores locally: stream instead
            client.presigned = False
            return None
        raise
    client.presigned = True
    return {"upload": upload, "etags": {}}


def _current(client, upload: dict) -> dict | None:
    """A saved upload as the service sees it now (``GET .../uploads/{id}``); None from a service too
    old to say (405), where the state file is all there is."""
    try:
        return client.api("GET", f"/v1/checkpoints/uploads/{quote(str(upload['id']), safe='')}").json()
    except RequestRejected as exc:
        if exc.status == 405:
            return None
        raise


def _send_parts(client, source: Source, state: UploadState, saved: dict, resumed: bool) -> dict:
    if resumed and (current := _current(client, saved["upload"])) is not None:
        # The service's word over the state file: fresh part URLs, and every part S3 holds, even
        # one whose ETag this machine never saved (cut between S3's answer and the state file).
        saved["upload"]["parts"] = current["parts"]
        saved["etags"] = {str(p["part_number"]): p["etag"] for p in current.get("uploaded") or []}
        state.save({"multipart": saved})
    upload, etags = saved["upload"], saved["etags"]
    size, part_size = source.size, int(upload["part_size"])
    parts = sorted(upload["parts"], key=lambda p: p["part_number"])
    if resumed:
        client.emit({"stage": "resuming", "upload": upload["id"], "parts_done": len(etags), "parts": len(parts)})
    sent = {"n": sum(min(part_size, size - (int(n) - 1) * part_size) for n in etags)}
    for part in parts:
        number = int(part["part_number"])
        if str(number) in etags:
            continue
        start = (number - 1) * part_size
        length = min(part_size, size - start)
        if length <= 0:
            raise BadInput(f"the service announced part {number}, past the end of the {size}-byte file")
        done_before = sent["n"]

        def body(start=start, length=length, done_before=done_before):
            sent["n"] = done_before
            return read_range(source.path, start, length, lambda n: _progress(client, sent, n, size))

        r = client.link("PUT", part["url"], content=body, headers={"Content-Length": str(length)},
                        what=f"upload part {number}/{len(parts)}")
        if not r.headers.get("etag"):
            raise LigoClientError(f"the storage answered part {number} without an ETag (a proxy removing it?)")
        etags[str(number)] = r.headers["etag"]
        state.save({"multipart": saved})
    done = [{"part_number": int(n), "etag": etags[n]} for n in sorted(etags, key=int)]
    r = client.api("POST", f"/v1/checkpoints/uploads/{quote(str(upload['id']), safe='')}/complete", json={"parts": done},
                   timeout=client.timeout(read=UPLOAD_READ_TIMEOUT))
    return r.json()
