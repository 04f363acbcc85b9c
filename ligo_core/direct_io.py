"""Write a large byte range of a file straight to the disk (O_DIRECT), not through the page cache.

A grown checkpoint is written once and not read back by this process. Through the page cache every
byte is copied into a freshly allocated cache page by the kernel, then written back: measured on
our 2-core VM, 16 GB took 20-23 s of kernel CPU time that way (as long as the write itself), and a
streamed grow spends both cores on making tensors. With O_DIRECT the disk reads the buffer itself:
the same 16 GB took 8 s and 0.8 s of CPU (docs/BENCHMARKS.md, "Real sizes").

O_DIRECT wants the file offset, the length and the memory address all on ALIGN-byte boundaries.
A range's whole blocks go direct when its memory is aligned as its file offset is (ShardWriter
allocates its buffers so: ``aligned_view``), else through a 64 MB aligned bounce buffer; the partial
blocks at either end, and ranges under DIRECT_MIN, go through the page cache. Where the system
refuses O_DIRECT (tmpfs, some network file systems, no O_DIRECT at all), everything does.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import torch

ALIGN = 4096  # the largest logical block size in common use: aligned to it, aligned to any
DIRECT_MIN = 2**20  # smaller ranges are not worth the two extra writes of their ends
BOUNCE = 2**26  # bytes of the bounce buffer for ranges whose memory is not aligned (a multiple of ALIGN)


def aligned_view(base: torch.Tensor, numel: int, start: int) -> torch.Tensor:
    """``numel`` elements of ``base`` (1D, at least ``slack(...)`` longer) whose address is congruent
    to the file offset ``start`` modulo ALIGN, so that the range's whole blocks need no copy."""
    item = base.element_size()
    skip = (start - base.data_ptr()) % ALIGN
    if skip % item:
        return base[:numel]  # an offset no element can meet: written through the bounce buffer
    return base[skip // item : skip // item + numel]


def slack(dtype: torch.dtype) -> int:
    """Extra elements to allocate for ``aligned_view``."""
    return ALIGN // dtype.itemsize


class RangeWriter:
    """Writes byte ranges into existing files; one per writing thread (it owns a bounce buffer)."""

    def __init__(self, direct: bool = True):
        self.direct = direct and hasattr(os, "O_DIRECT")
        self._bounce: torch.Tensor | None = None

    def write(self, path: Path, start: int, data: torch.Tensor) -> None:
        """Write ``data`` (a contiguous CPU tensor) at byte ``start`` of ``path``."""
        raw = data.reshape(-1).view(torch.uint8)
        end = start + raw.numel()
        first, last = -(-start // ALIGN) * ALIGN, end // ALIGN * ALIGN  # the whole blocks inside the range
        with open(path, "r+b", buffering=0) as f:
            if not self.direct or raw.numel() < DIRECT_MIN or last - first < ALIGN:
                _write_every(f.fileno(), raw, start)
                return
            _write_every(f.fileno(), raw[: first - start], start)
            _write_every(f.fileno(), raw[last - start :], last)
            middle = raw[first - start : last - start]
            done = self._write_direct(path, middle, first)
            if done < middle.numel():  # refused part way: the rest through the page cache
                _write_every(f.fileno(), middle[done:], first + done)

    def _write_direct(self, path: Path, middle: torch.Tensor, offset: int) -> int:
        """Bytes of ``middle`` written with O_DIRECT from the start (all of them, unless refused)."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.direct = False  # this file system has no O_DIRECT
            return 0
        done = 0
        try:
            if middle.data_ptr() % ALIGN == 0:
                done = _write_all(fd, middle, offset)
            else:
                bounce = self._bounce_buffer()
                while done < middle.numel():
                    part = middle[done : done + bounce.numel()]
                    bounce[: part.numel()].copy_(part)  # a torch copy: the GIL is free meanwhile
                    written = _write_all(fd, bounce[: part.numel()], offset + done)
                    done += written
                    if written < part.numel():
                        break
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.direct = False  # opened, but the data was refused: never again for this writer
        finally:
            os.close(fd)
        return done

    def _bounce_buffer(self) -> torch.Tensor:
        if self._bounce is None:
            self._bounce = torch.frombuffer(mmap.mmap(-1, BOUNCE), dtype=torch.uint8)  # mmap: page aligned
        return self._bounce


def _write_all(fd: int, raw: torch.Tensor, offset: int) -> int:
    """pwrite every byte of ``raw`` (uint8) at ``offset``, in as many calls as the kernel wants;
    the bytes written (fewer only if a call wrote nothing)."""
    view = memoryview(raw.numpy())
    done = 0
    while done < len(view):
        written = _pwrite(fd, view[done:], offset + done)
        if written <= 0:
            break
        done += written
    return done


def _write_every(fd: int, raw: torch.Tensor, offset: int) -> None:
    """``_write_all`` through the page cache, where writing fewer bytes than asked is an error."""
    if _write_all(fd, raw, offset) < raw.numel():
        raise OSError(errno.EIO, f"short write at byte {offset}")


def _pwrite(fd: int, data: memoryview, offset: int) -> int:
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, data, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # no pwrite (Windows): one thread writes each file descriptor
    return os.write(fd, data)
