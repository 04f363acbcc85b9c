"""A job's result onto disk: every file through its signed link, checked against the size and
SHA-256 the service recorded, fetched again when it does not match, written into a temporary
sibling folder that is renamed to the destination only when every file is right."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath

import httpx

from ligo_client.errors import BadInput, IntegrityError, LigoClientError, RequestRejected, ServiceUnreachable

ATTEMPTS = 4  # per file
SHA256 = re.compile(r"[0-9a-f]{64}")
CHUNK = 2**20


def check_destination(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"{out} exists and is not an empty directory")


def _safe_path(path) -> PurePosixPath:
    """A result path is only trusted to name a file inside the destination."""
    p = PurePosixPath(path) if isinstance(path, str) else None
    if (p is None or not path or "\x00" in path or "\\" in path or p.is_absolute() or ".." in p.parts
            or ":" in p.parts[0] or any(part in ("", ".") for part in path.split("/"))):
        raise LigoClientError(f"the service listed an unsafe output path {path!r}")
    return p


def _entries(result: dict) -> list[dict]:
    entries, seen = [], set()
    for f in result.get("files") or []:
        path = _safe_path(f.get("path"))
        size, sha = f.get("size_bytes"), f.get("sha256")
        if not isinstance(size, int) or size < 0 or (sha is not None and not SHA256.fullmatch(str(sha))):
            raise LigoClientError(f"the service listed {path} with an unusable size or sha256")
        if path.as_posix().lower() in seen:
            raise LigoClientError(f"the service listed {path} twice")
        seen.add(path.as_posix().lower())
        entries.append({"path": path, "size": size, "sha256": sha, "url": f.get("url")})
    if not entries:
        raise LigoClientError("the job's result lists no files")
    return entries


def download(client, job_id: str, out: Path) -> Path:
    check_destination(out)  # before asking for anything
    entries = _entries(client.result(job_id))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        links = {e["path"].as_posix(): e["url"] for e in entries}
        total = sum(e["size"] for e in entries)
        for index, entry in enumerate(entries, 1):
            _fetch_verified(client, job_id, entry, tmp, links, {"index": index, "count": len(entries)})
        check_destination(out)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)  # same parent, so same file system: atomic
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    client.emit({"stage": "downloaded", "out": str(out), "files": len(entries), "bytes": total})
    return out


def _fetch_verified(client, job_id: str, entry: dict, tmp: Path, links: dict, position: dict) -> None:
    name = entry["path"].as_posix()
    dest = tmp / entry["path"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, ATTEMPTS + 1):
        try:
            size, sha = _fetch(client, links[name], dest, entry["size"], {"path": name, **position})
        except RequestRejected as exc:
            if exc.status not in (403, 404):
                raise
            problem = f"the link answered {exc.status} (expired?); asking for fresh links"
            links.update({e["path"].as_posix(): e["url"] for e in _entries(client.result(job_id))})
        except ServiceUnreachable as exc:
            problem = str(exc)
        else:
            if size != entry["size"]:
                problem = f"got {size} bytes, expected {entry['size']}"
            elif entry["sha256"] is not None and sha != entry["sha256"]:
                problem = f"sha256 {sha[:12]}... does not match the recorded {entry['sha256'][:12]}..."
            else:
                return
        if attempt == ATTEMPTS:
            raise IntegrityError(f"{name}: {problem} (tried {ATTEMPTS} times)")
        delay = client.retry.delay(attempt - 1)
        client.emit({"stage": "retrying", "what": f"download {name}", "attempt": attempt, "reason": problem,
                     "delay": delay})
        time.sleep(delay)


def _fetch(client, url: str, dest: Path, expected: int, where: dict) -> tuple[int, str]:
    """(size, sha256) of what the link sent, written to ``dest``; reading stops just past the
    expected size, so a wrong answer cannot fill the disk."""
    sha, size = hashlib.sha256(), 0
    response = client.link("GET", url, stream=True, what=f"download {where['path']}")
    try:
        with open(dest, "wb") as f:
            for chunk in response.iter_bytes(CHUNK):
                size += len(chunk)
                if size > expected:
                    break
                sha.update(chunk)
                f.write(chunk)
                client.emit({"stage": "downloading", "received": size, "total": expected, **where})
    except httpx.TransportError as exc:
        raise ServiceUnreachable(f"download {where['path']}: {type(exc).__name__}: {exc}") from exc
    finally:
        response.close()
    return size, sha.hexdigest()
