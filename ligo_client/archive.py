"""A model directory packed as a plain .tar with fixed metadata, so the same files always give
the same bytes and the same SHA-256: the idempotency key and the resume state of an upload
depend on it. Not compressed: weights hardly shrink, gzip would cost minutes of CPU on a large
model, and zlib builds differ in their output."""

from __future__ import annotations

import hashlib
import io
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

CHUNK = 2**20


class _HashingWriter(io.RawIOBase):
    def __init__(self, raw):
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.raw.write(data)


def model_files(directory: Path) -> list[Path]:
    """Files under ``directory`` in a fixed order, leaving out hidden ones (.git, .cache, ...).
    Links are followed: a Hugging Face cache snapshot links each file to its blob."""
    files = []
    for path in directory.rglob("*"):
        rel = path.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        files.append(path)
    return sorted(files, key=lambda p: PurePosixPath(p.relative_to(directory)).as_posix())


def pack_directory(directory: Path, scratch: Path) -> tuple[Path, str, int]:
    """(archive path in ``scratch``, its sha256, its size); the caller removes the archive."""
    scratch.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=scratch, prefix=f"{directory.name[:40]}-", suffix=".tar", delete=False)
    path = Path(handle.name)
    try:
        with handle:
            writer = _HashingWriter(handle)
            with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for file in model_files(directory):
                    info = tarfile.TarInfo(PurePosixPath(file.relative_to(directory)).as_posix())
                    info.size, info.mode, info.mtime = file.stat().st_size, 0o644, 0
                    with open(file, "rb") as f:
                        tar.addfile(info, f)
        return path, writer.sha.hexdigest(), writer.size
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def hash_file(path: Path) -> tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def read_range(path: Path, start: int, length: int, on_chunk=None):
    """The bytes [start, start + length) of a file, a chunk at a time (a request body)."""
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                raise OSError(f"{path} shrank while it was being sent")
            left -= len(chunk)
            if on_chunk is not None:
                on_chunk(len(chunk))
            yield chunk
