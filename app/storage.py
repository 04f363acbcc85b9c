"""Object storage: one interface, a local directory (default) and S3-compatible stores.

Keys look like ``checkpoints/{id}/model.tar.gz``, ``jobs/{id}/output/config.json`` and
``jobs/{id}/manifest.json``. Downloads go out as links that expire: presigned SigV4 URLs for
S3, and for the local directory an HMAC-signed token the API serves at ``/v1/files/{token}``.
Streamed uploads go through a writer that the caller commits only after validating the bytes
it can read back from ``writer.local_path``; an aborted writer leaves nothing behind.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import quote

MiB = 2**20
S3_MIN_PART = 5 * MiB
S3_MAX_PARTS = 10_000


class StorageError(Exception):
    """A storage operation failed (missing object, bad key, unreachable store)."""


class ObjectNotFound(StorageError):
    pass


def file_sha256(path: Path) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex digest) of a file: what a checkpoint row and a result's manifest record."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256")
        return f.tell(), digest.hexdigest()


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


def check_key(key: str) -> str:
    p = PurePosixPath(key)
    if not key or key.startswith("/") or any(part in ("", ".", "..") for part in key.split("/")) or p.is_absolute():
        raise StorageError(f"invalid object key {key!r}")
    return key


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise StorageError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[5:].partition("/")
    if not bucket or not key:
        raise StorageError(f"{uri!r} needs a bucket and a key: s3://bucket/key")
    return bucket, key


class ObjectWriter(ABC):
    """A streamed upload: ``write`` chunks, then ``commit`` (publish) or ``abort`` (discard)."""

    local_path: Path  # a complete local copy of what was written, for validation

    @abstractmethod
    def write(self, data: bytes) -> None: ...

    def finish(self) -> None:
        """No more data: ``local_path`` is complete (flushed and closed) from here on."""
        self._file.close()

    @abstractmethod
    def commit(self) -> None: ...

    @abstractmethod
    def abort(self) -> None: ...


class Storage(ABC):
    kind: str

    @abstractmethod
    def open_writer(self, key: str) -> ObjectWriter: ...

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def download(self, key: str, dest: Path) -> None: ...

    @abstractmethod
    def list(self, prefix: str) -> list[ObjectInfo]: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> int:
        objects = self.list(prefix)
        for obj in objects:
            self.delete(obj.key)
        return len(objects)

    def exists(self, key: str) -> bool:
        return any(o.key == key for o in self.list(key))

    @abstractmethod
    def download_url(self, key: str, filename: str, ttl: int, base_url: str) -> str: ...

    @abstractmethod
    def check(self) -> None:
        """Raise StorageError if the store cannot be written."""


# --- signed links for the local directory ------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_token(secret: bytes, key: str, filename: str, ttl: int, now: float | None = None) -> str:
    payload = json.dumps({"k": key, "n": filename, "e": int((now or time.time()) + ttl)}, separators=(",", ":"))
    body = _b64(payload.encode())
    mac = hmac.new(secret, body.encode(), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}"


def verify_token(secret: bytes, token: str, now: float | None = None) -> tuple[str, str]:
    """(key, filename) of a valid, unexpired token; StorageError otherwise."""
    try:
        body, mac = token.split(".")
        expected = hmac.new(secret, body.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64(mac)):
            raise ValueError("bad signature")
        payload = json.loads(_unb64(body))
        key, filename, expires = payload["k"], payload["n"], payload["e"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StorageError("invalid download link") from exc
    if expires < (now or time.time()):
        raise StorageError("download link expired")
    return check_key(key), filename


# --- local directory ---------------------------------------------------------------------------

class LocalWriter(ObjectWriter):
    def __init__(self, storage: LocalStorage, key: str):
        self._storage, self._key = storage, key
        partial = storage.root / ".partial"
        partial.mkdir(parents=True, exist_ok=True)
        # Keep the file name: the checkpoint reader tells archive kinds apart by suffix.
        self.local_path = partial / f"{uuid.uuid4().hex}-{key.rsplit('/', 1)[-1]}"
        self._file = open(self.local_path, "wb")  # noqa: SIM115 - closed in commit/abort

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def commit(self) -> None:
        self.finish()
        dest = self._storage.path_of(self._key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.local_path, dest)

    def abort(self) -> None:
        self._file.close()
        self.local_path.unlink(missing_ok=True)


class LocalStorage(Storage):
    kind = "local"

    def __init__(self, root: Path, secret: bytes):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.secret = secret

    def path_of(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if self.root not in path.parents:
            raise StorageError(f"invalid object key {key!r}")
        return path

    def open_writer(self, key: str) -> ObjectWriter:
        check_key(key)
        return LocalWriter(self, key)

    def _atomic_write(self, key: str, fill) -> None:
        dest = self.path_of(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                fill(f)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, key: str, path: Path) -> None:
        with open(path, "rb") as source:
            self._atomic_write(key, lambda f: shutil.copyfileobj(source, f, 4 * MiB))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda f: f.write(data))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.path_of(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def download(self, key: str, dest: Path) -> None:
        src = self.path_of(key)
        if not src.is_file():
            raise ObjectNotFound(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)

    def list(self, prefix: str) -> list[ObjectInfo]:
        out = []
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return out
        for path in base.rglob("*"):
            if not path.is_file() or path.name.startswith(".tmp-"):
                continue
            key = path.relative_to(self.root).as_posix()
            if key.startswith(prefix) and not key.startswith(".partial/"):
                out.append(ObjectInfo(key, path.stat().st_size))
        return sorted(out, key=lambda o: o.key)

    def exists(self, key: str) -> bool:
        return self.path_of(key).is_file()

    def delete(self, key: str) -> None:
        path = self.path_of(key)
        path.unlink(missing_ok=True)
        # Remove emptied parent folders up to the root.
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def download_url(self, key: str, filename: str, ttl: int, base_url: str) -> str:
        token = sign_token(self.secret, key, filename, ttl)
        return f"{base_url.rstrip('/')}/v1/files/{token}"

    def check(self) -> None:
        probe = self.root / f".readyz-{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise StorageError(f"cannot write to {self.root}: {exc}") from None


# --- S3-compatible -----------------------------------------------------------------------------

class S3Writer(ObjectWriter):
    """Multipart upload as the bytes arrive, plus a local spool copy for validation."""

    def __init__(self, storage: S3Storage, key: str, spool_dir: Path, part_size: int):
        self._s3, self._key, self._part_size = storage, storage.full_key(key), part_size
        spool_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=spool_dir, prefix="upload-", suffix="-" + key.rsplit("/", 1)[-1])
        self.local_path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._buffer = bytearray()
        self._parts: list[dict] = []
        self._upload_id: str | None = None

    def _flush_part(self) -> None:
        client = self._s3.client
        if self._upload_id is None:
            self._upload_id = client.create_multipart_upload(Bucket=self._s3.bucket, Key=self._key)["UploadId"]
        number = len(self._parts) + 1
        resp = client.upload_part(Bucket=self._s3.bucket, Key=self._key, UploadId=self._upload_id,
                                  PartNumber=number, Body=bytes(self._buffer))
        self._parts.append({"PartNumber": number, "ETag": resp["ETag"]})
        self._buffer.clear()

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._buffer += data
        if len(self._buffer) >= self._part_size:
            self._flush_part()

    def commit(self) -> None:
        self.finish()
        client = self._s3.client
        if self._upload_id is None:
            client.put_object(Bucket=self._s3.bucket, Key=self._key, Body=bytes(self._buffer))
        else:
            if self._buffer:
                self._flush_part()
            client.complete_multipart_upload(Bucket=self._s3.bucket, Key=self._key, UploadId=self._upload_id,
                                             MultipartUpload={"Parts": self._parts})
        self._buffer = bytearray()
        self.local_path.unlink(missing_ok=True)

    def abort(self) -> None:
        self._file.close()
        self._buffer = bytearray()
        self.local_path.unlink(missing_ok=True)
        if self._upload_id is not None:
            self._s3.client.abort_multipart_upload(Bucket=self._s3.bucket, Key=self._key, UploadId=self._upload_id)


class S3Storage(Storage):
    kind = "s3"

    def __init__(self, bucket: str, *, prefix: str = "", endpoint_url: str | None = None,
                 public_endpoint_url: str | None = None, region: str = "us-east-1",
                 access_key_id: str | None = None, secret_access_key: str | None = None,
                 addressing_style: str = "path", spool_dir: Path | None = None,
                 multipart_threshold: int = 64 * MiB, part_size: int = 64 * MiB, stream_part_size: int = 8 * MiB):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/") + "/" if prefix.strip("/") else ""
        config = Config(signature_version="s3v4", s3={"addressing_style": addressing_style},
                        retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60)
        creds = {}
        if access_key_id:
            creds = {"aws_access_key_id": access_key_id, "aws_secret_access_key": secret_access_key}
        session = boto3.session.Session(region_name=region, **creds)
        self.client = session.client("s3", endpoint_url=endpoint_url, config=config)
        # Presigned URLs carry the endpoint host in their signature: sign with the host
        # clients will use when that differs from the one the service talks to.
        self.public_client = (
            session.client("s3", endpoint_url=public_endpoint_url, config=config)
            if public_endpoint_url and public_endpoint_url != endpoint_url else self.client
        )
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=part_size)
        self.spool_dir = Path(spool_dir or tempfile.gettempdir())
        self.stream_part_size = max(S3_MIN_PART, stream_part_size)

    def full_key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _rel(self, full: str) -> str:
        return full[len(self.prefix):]

    def _translate(self, exc: Exception, key: str) -> Exception:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code")
        if code in ("404", "NoSuchKey", "NotFound"):
            return ObjectNotFound(key)
        return StorageError(f"S3 error on {key!r}: {exc}")

    def open_writer(self, key: str) -> ObjectWriter:
        return S3Writer(self, key, self.spool_dir, self.stream_part_size)

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self.full_key(key), Config=self.transfer)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.full_key(key), Body=data)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.full_key(key))["Body"].read()
        except Exception as exc:  # botocore.exceptions.ClientError
            raise self._translate(exc, key) from None

    def download(self, key: str, dest: Path) -> None:
        self.download_uri(self.bucket, self.full_key(key), dest)

    def download_uri(self, bucket: str, full_key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(bucket, full_key, str(dest), Config=self.transfer)
        except Exception as exc:
            raise self._translate(exc, full_key) from None

    def head_uri(self, bucket: str, full_key: str) -> int:
        try:
            return int(self.client.head_object(Bucket=bucket, Key=full_key)["ContentLength"])
        except Exception as exc:
            raise self._translate(exc, full_key) from None

    def list(self, prefix: str) -> list[ObjectInfo]:
        out = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            for obj in page.get("Contents", []):
                out.append(ObjectInfo(self._rel(obj["Key"]), int(obj["Size"])))
        return out

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.full_key(key))
            return True
        except Exception as exc:
            if isinstance(self._translate(exc, key), ObjectNotFound):
                return False
            raise self._translate(exc, key) from None

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.full_key(key))

    def delete_prefix(self, prefix: str) -> int:
        keys = [o.key for o in self.list(prefix)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self.full_key(k)} for k in keys[start:start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)

    def download_url(self, key: str, filename: str, ttl: int, base_url: str) -> str:
        return self.public_client.generate_presigned_url(
            "get_object", ExpiresIn=ttl,
            Params={"Bucket": self.bucket, "Key": self.full_key(key),
                    "ResponseContentDisposition": f"attachment; filename*=UTF-8''{quote(filename)}"},
        )

    # Presigned multipart upload: the client sends the parts straight to S3.
    def create_multipart(self, key: str) -> str:
        return self.client.create_multipart_upload(Bucket=self.bucket, Key=self.full_key(key))["UploadId"]

    def presign_part(self, key: str, upload_id: str, number: int, ttl: int) -> str:
        return self.public_client.generate_presigned_url(
            "upload_part", ExpiresIn=ttl,
            Params={"Bucket": self.bucket, "Key": self.full_key(key), "UploadId": upload_id, "PartNumber": number},
        )

    def uploaded_parts(self, key: str, upload_id: str) -> list[tuple[int, str]]:
        """(part number, ETag) of every part S3 holds for a multipart upload in progress."""
        try:
            pages = self.client.get_paginator("list_parts").paginate(
                Bucket=self.bucket, Key=self.full_key(key), UploadId=upload_id)
            return [(p["PartNumber"], p["ETag"]) for page in pages for p in page.get("Parts", [])]
        except Exception as exc:
            raise StorageError(f"could not list the upload's parts: {exc}") from None

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> None:
        try:
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=self.full_key(key), UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etag} for n, etag in parts]},
            )
        except Exception as exc:
            raise StorageError(f"could not complete the upload: {exc}") from None

    def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.full_key(key), UploadId=upload_id)
        except Exception as exc:
            if not isinstance(self._translate(exc, key), ObjectNotFound) and "NoSuchUpload" not in str(exc):
                raise StorageError(f"could not abort the upload: {exc}") from None

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise StorageError(f"bucket {self.bucket!r} not reachable: {exc}") from None


def make_storage(settings) -> Storage:
    if settings.storage_backend == "s3":
        if not settings.s3_bucket:
            raise StorageError("LIGO_STORAGE_BACKEND=s3 needs LIGO_S3_BUCKET")
        return S3Storage(
            settings.s3_bucket, prefix=settings.s3_prefix, endpoint_url=settings.s3_endpoint_url,
            public_endpoint_url=settings.s3_public_endpoint_url, region=settings.s3_region,
            access_key_id=settings.s3_access_key_id, secret_access_key=settings.s3_secret_access_key,
            addressing_style=settings.s3_addressing_style, spool_dir=settings.resolved_tmp_dir / "uploads",
            multipart_threshold=settings.s3_multipart_threshold_bytes, part_size=settings.s3_part_size_bytes,
        )
    return LocalStorage(settings.resolved_storage_dir, settings.signing_key())
