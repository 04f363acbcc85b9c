"""Archives and the names inside a checkpoint: member names, links and sizes checked before
extraction, and every file a checkpoint names kept inside it."""

from __future__ import annotations

import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from ligo_core.errors import CheckpointError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
MAX_ARCHIVE_MEMBERS = 10_000
DEFAULT_MAX_EXTRACT_BYTES = 200 * 2**30


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def unsafe_name(name: str) -> bool:
    """True for a name that could point outside the folder it is read in: absolute, a drive,
    a parent reference, a backslash path or an embedded NUL."""
    if not name or "\x00" in name or "\\" in name:
        return True
    p = PurePosixPath(name)
    return p.is_absolute() or ".." in p.parts or (bool(p.parts) and ":" in p.parts[0])


def confined(directory: Path, name, what: str, follow_links: bool = False) -> Path:
    """``directory / name`` for a file that a checkpoint names (a shard in its index, a tokenizer
    file), refused unless it stays inside the checkpoint.

    A name that could leave the folder (absolute, ``..``) is refused always. Unless
    ``follow_links`` (a user's own directory on the command line, such as a Hugging Face cache
    snapshot whose files link to its blob store), the file must also resolve inside the folder
    once links are followed: an upload can never read another tenant's files or the server's."""
    if not isinstance(name, str) or unsafe_name(name):
        raise CheckpointError(f"{what} names {name!r}, which points outside the checkpoint")
    path = directory / name
    if not follow_links and not path.resolve().is_relative_to(directory.resolve()):
        raise CheckpointError(f"{what} names {name!r}, which resolves outside the checkpoint")
    return path


def _check_members(members: list[tuple[str, int, str]], max_bytes: int) -> None:
    """Refuse an archive before extracting anything: (name, size, kind) per member."""
    if len(members) > MAX_ARCHIVE_MEMBERS:
        raise CheckpointError(f"archive has {len(members)} members, more than {MAX_ARCHIVE_MEMBERS}")
    total = 0
    for name, size, kind in members:
        if unsafe_name(name.replace("\\", "/")):
            raise CheckpointError(f"archive member {name!r} points outside the archive")
        if kind == "link":
            raise CheckpointError(f"archive member {name!r} is a link; links are not accepted")
        if kind == "other":
            raise CheckpointError(f"archive member {name!r} is not a regular file or directory")
        total += size
        if total > max_bytes:
            raise CheckpointError(f"archive expands to more than {max_bytes} bytes")


def _tar_kind(m: tarfile.TarInfo) -> str:
    return "link" if m.issym() or m.islnk() else "file" if m.isfile() or m.isdir() else "other"


def extract_tar(path: Path, dest: Path, max_bytes: int) -> None:
    try:
        with tarfile.open(path) as tar:
            _check_members([(m.name, m.size, _tar_kind(m)) for m in tar.getmembers()], max_bytes)
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path.name}: not a readable tar archive ({exc})") from None


def extract_zip(path: Path, dest: Path, max_bytes: int) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            _check_members([
                (i.filename, i.file_size, "link" if stat.S_ISLNK(i.external_attr >> 16) else "file")
                for i in zf.infolist()
            ], max_bytes)
            bad = zf.testzip()
            if bad is not None:
                raise CheckpointError(f"archive member {bad!r} is corrupt")
            zf.extractall(dest)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"{path.name}: not a readable zip archive ({exc})") from None


def extract(path: Path, dest: Path, max_bytes: int = DEFAULT_MAX_EXTRACT_BYTES) -> None:
    if path.name.lower().endswith(".zip"):
        extract_zip(path, dest, max_bytes)
    else:
        extract_tar(path, dest, max_bytes)
