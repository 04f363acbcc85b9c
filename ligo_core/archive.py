"""Archives and the names inside a checkpoint: member names, links and sizes checked, only model
files written, and every file a checkpoint names kept inside it (``confined``).

Every member is checked (no absolute or parent paths, no links, no devices), the members'
sizes may add up to at most ``max_bytes`` and to at most ``max_ratio`` times the archive's own
size (a decompression bomb stops at the first header past the limit, before its data is
inflated), and only the files a checkpoint reader uses are written: ``config.json``, weights
and their index, tokenizer files. The rest (READMEs, optimizer states, training arguments) is
skipped. Bytes are counted while writing too, so a member cannot write more than it declared.
"""

from __future__ import annotations

import fnmatch
import lzma
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from ligo_core.errors import CheckpointError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
MAX_ARCHIVE_MEMBERS = 10_000
DEFAULT_MAX_EXTRACT_BYTES = 200 * 2**30
# Weights hardly compress (random-looking floats), so a real checkpoint expands by a small
# factor; a bomb expands by hundreds. Small archives may expand freely up to FREE_EXPANSION.
MAX_EXPANSION_RATIO = 20.0
FREE_EXPANSION_BYTES = 64 * 2**20
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "vocab.txt", "tokenizer.model", "added_tokens.json",
)
# What a checkpoint reader opens besides the tokenizer files: its config, weights and their index; other weight formats too, so that the reader can name
# them ("unsupported weight format"). The reader bounds each small file's size itself.
MODEL_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
               "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack", "model.ckpt.index",
               "pytorch_model.pt", "model.pt")
COPY_CHUNK = 2**20


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


def needed(name: str) -> bool:
    """Whether a member (by its file name) is one a checkpoint reader opens."""
    base = PurePosixPath(name).name
    return base in TOKENIZER_FILES or any(fnmatch.fnmatchcase(base, pattern) for pattern in MODEL_FILES)


def _wanted(name: str, skipped: list[str]) -> bool:
    if not needed(name):
        skipped.append(name)
        return False
    return True


class _Budget:
    """The bytes an archive may expand to: declared sizes are counted before any data is read,
    written bytes while copying."""

    def __init__(self, archive_size: int, max_bytes: int, max_ratio: float):
        self.archive_size, self.max_bytes, self.max_ratio = archive_size, max_bytes, max_ratio
        self.limit = min(max_bytes, max(int(max_ratio * archive_size), FREE_EXPANSION_BYTES))
        self.declared = 0
        self.members = 0

    def add(self, name: str, size: int, kind: str) -> None:
        """Count one member (name, declared size, 'file' | 'dir' | 'link' | 'other'); refuse a bad one."""
        self.members += 1
        if self.members > MAX_ARCHIVE_MEMBERS:
            raise CheckpointError(f"archive has more than {MAX_ARCHIVE_MEMBERS} members")
        if unsafe_name(name.replace("\\", "/")):
            raise CheckpointError(f"archive member {name!r} points outside the archive")
        if kind == "link":
            raise CheckpointError(f"archive member {name!r} is a link; links are not accepted")
        if kind == "other":
            raise CheckpointError(f"archive member {name!r} is not a regular file or directory")
        self.declared += max(size, 0)
        self.check(self.declared)

    def check(self, total: int) -> None:
        if total <= self.limit:
            return
        if self.limit == self.max_bytes:
            raise CheckpointError(f"archive expands to more than {self.max_bytes} bytes, the extraction limit")
        raise CheckpointError(
            f"archive expands to more than {self.max_ratio:g} times its size of {self.archive_size} bytes "
            "(a decompression bomb?); model weights hardly compress")


def _copy(src: BinaryIO, dest: Path, name: str, size: int) -> None:
    """Write one member, at most ``size`` bytes (its declared size); an existing file is a duplicate."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        out = open(dest, "xb")  # noqa: SIM115 - closed below
    except FileExistsError:
        raise CheckpointError(f"archive member {name!r} appears more than once") from None
    except OSError as exc:  # a member under a name that is a file, a full disk: never show our paths
        raise CheckpointError(f"archive member {name!r} cannot be written ({exc.strerror})") from None
    written = 0
    with out:
        while chunk := src.read(COPY_CHUNK):
            written += len(chunk)
            if written > size:
                raise CheckpointError(f"archive member {name!r} holds more than the {size} bytes it declares")
            out.write(chunk)
    if written != size:
        raise CheckpointError(f"archive member {name!r} is truncated ({written} of {size} bytes)")


def _tar_kind(m: tarfile.TarInfo) -> str:
    if m.issym() or m.islnk():
        return "link"
    if m.isdir():
        return "dir"
    return "file" if m.isreg() and not m.issparse() else "other"


def extract_tar(path: Path, dest: Path, budget: _Budget) -> list[str]:
    skipped = []
    try:
        with tarfile.open(path) as tar:
            for m in tar:  # headers one by one: a bomb is refused before its data is inflated
                kind = _tar_kind(m)
                budget.add(m.name, m.size if kind == "file" else 0, kind)
                if kind != "file" or not _wanted(m.name, skipped):
                    continue
                with tar.extractfile(m) as src:
                    _copy(src, dest / m.name, m.name, m.size)
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        raise CheckpointError(f"{path.name}: not a readable tar archive ({exc})") from None
    return skipped


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "link"
    if info.is_dir():
        return "dir"
    return "other" if mode and not stat.S_ISREG(mode) else "file"


def extract_zip(path: Path, dest: Path, budget: _Budget) -> list[str]:
    skipped = []
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            for info in infos:  # the central directory: every size is known before inflating anything
                kind = _zip_kind(info)
                budget.add(info.filename, info.file_size if kind == "file" else 0, kind)
            for info in infos:
                if _zip_kind(info) != "file" or not _wanted(info.filename, skipped):
                    continue
                with zf.open(info) as src:  # checks the CRC at the end
                    _copy(src, dest / info.filename, info.filename, info.file_size)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, lzma.LZMAError, NotImplementedError,
            RuntimeError) as exc:  # RuntimeError: an encrypted member
        raise CheckpointError(f"{path.name}: not a readable zip archive ({exc})") from None
    return skipped


def extract(path: Path, dest: Path, max_bytes: int = DEFAULT_MAX_EXTRACT_BYTES,
            max_ratio: float = MAX_EXPANSION_RATIO) -> list[str]:
    """Extract the model files of the archive at ``path`` into ``dest``; returns the members skipped.

    On any refusal ``dest`` may hold part of the archive: the caller removes it."""
    budget = _Budget(path.stat().st_size, max_bytes, max_ratio)
    if path.name.lower().endswith(".zip"):
        return extract_zip(path, dest, budget)
    return extract_tar(path, dest, budget)
