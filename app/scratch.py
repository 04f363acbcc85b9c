"""Scratch folders that tell the living from the dead, and the sweep that removes the dead's.

A folder made by ``folder()`` holds a ``.lock`` file with an exclusive ``flock`` for as long as
its process lives; the kernel drops the lock when the process dies, even by SIGKILL. ``sweep``
removes the folders whose lock it can take, so a killed job attempt or validator leaves
nothing behind once the next one starts, and a live one on the same disk is never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("ligo.scratch")
LOCK = ".lock"
UNLOCKED_GRACE_SECONDS = 60.0  # a folder without a lock file may be one being made right now


def claim(root: Path, prefix: str) -> tuple[Path, int]:
    """A new folder under ``root`` and the descriptor holding its lock (close it to release)."""
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return path, fd


@contextlib.contextmanager
def folder(root: Path, prefix: str) -> Iterator[Path]:
    """A locked scratch folder, removed on exit."""
    path, fd = claim(root, prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def _abandoned(path: Path) -> bool:
    try:
        fd = os.open(path / LOCK, os.O_RDWR)
    except FileNotFoundError:  # made by an older version, or being made: judge by age
        return time.time() - path.stat().st_mtime > UNLOCKED_GRACE_SECONDS
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False  # its owner is alive
    finally:
        os.close(fd)


def sweep(root: Path, prefixes: tuple[str, ...]) -> list[str]:
    """Remove the folders under ``root`` starting with one of ``prefixes`` whose owner is gone."""
    removed = []
    if not root.is_dir():
        return removed
    for path in root.iterdir():
        if not path.name.startswith(prefixes) or path.is_symlink() or not path.is_dir():
            continue
        with contextlib.suppress(OSError):
            if _abandoned(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
    if removed:
        log.info("removed %d abandoned scratch folder(s) in %s: %s", len(removed), root, ", ".join(removed))
    return removed
