"""Direct writes (ligo_core/direct_io.py): the bytes land where asked, whatever the alignment of
the range and of its memory, and through the page cache where O_DIRECT is refused."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from ligo_core import direct_io
from ligo_core.direct_io import ALIGN, RangeWriter, aligned_view, slack


@pytest.fixture
def small_direct(monkeypatch):
    """Ranges from 2 blocks up go direct, so tests stay small."""
    monkeypatch.setattr(direct_io, "DIRECT_MIN", 2 * ALIGN)
    monkeypatch.setattr(direct_io, "BOUNCE", 4 * ALIGN)


@pytest.fixture
def direct_opens(monkeypatch):
    """The file descriptors opened with O_DIRECT."""
    opened = []
    real_open = os.open

    def recording_open(path, flags, *args):
        fd = real_open(path, flags, *args)
        if flags & getattr(os, "O_DIRECT", 0):
            opened.append(fd)
        return fd

    monkeypatch.setattr(direct_io.os, "open", recording_open)
    return opened


def _ranges() -> list[tuple[int, int]]:
    """(start, length): unaligned starts and ends, one under DIRECT_MIN, one of many bounce buffers."""
    return [(8, 3 * ALIGN + 100), (5 * ALIGN - 6, 17 * ALIGN + 2), (40 * ALIGN, ALIGN + 1), (60 * ALIGN + 2, 9 * ALIGN)]


@pytest.mark.parametrize("memory", ["aligned", "misaligned"])
def test_ranges_land_where_asked(tmp_path, small_direct, direct_opens, memory):
    path = tmp_path / "f"
    total = 80 * ALIGN
    path.write_bytes(b"\0" * total)
    expected = bytearray(total)
    writer = RangeWriter()
    g = torch.Generator().manual_seed(0)
    for start, length in _ranges():
        data = torch.randint(0, 256, (length,), dtype=torch.uint8, generator=g)
        if memory == "aligned":  # as ShardWriter allocates: memory congruent to the file offset
            data = aligned_view(torch.empty(length + slack(torch.uint8), dtype=torch.uint8), length, start).copy_(data)
        else:  # one byte off: the whole blocks go through the bounce buffer
            base = torch.empty(length + 2 * ALIGN, dtype=torch.uint8)
            data = aligned_view(base, length + 1, start)[1:].copy_(data)
        writer.write(path, start, data)
        expected[start : start + length] = bytes(data.numpy())
    assert path.read_bytes() == bytes(expected)
    if writer.direct:  # O_DIRECT is there (not tmpfs): the three large ranges went direct
        assert len(direct_opens) == 3


def test_refused_direct_writes_go_through_the_page_cache(tmp_path, small_direct, direct_opens, monkeypatch):
    """A file system that opens with O_DIRECT but refuses the data (EINVAL) gets every byte anyway."""
    real_pwrite = os.pwrite

    def refusing_pwrite(fd, data, offset):
        if fd in direct_opens:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(direct_io.os, "pwrite", refusing_pwrite)
    path = tmp_path / "f"
    path.write_bytes(b"\0" * (40 * ALIGN))
    data = torch.arange(30 * ALIGN, dtype=torch.int32).to(torch.uint8)
    writer = RangeWriter()
    writer.write(path, 3, data)
    assert path.read_bytes()[3 : 3 + data.numel()] == bytes(data.numpy())
    assert not writer.direct  # not tried again


def test_writer_without_direct_io(tmp_path, small_direct, direct_opens):
    path = tmp_path / "f"
    path.write_bytes(b"\0" * (20 * ALIGN))
    data = torch.full((10 * ALIGN,), 7, dtype=torch.uint8)
    RangeWriter(direct=False).write(path, ALIGN, data)
    assert path.read_bytes()[ALIGN : 11 * ALIGN] == bytes(data.numpy()) and not direct_opens


def test_aligned_view_matches_the_file_offset():
    base = torch.empty(1000 + slack(torch.bfloat16), dtype=torch.bfloat16)
    for start in (0, 8, 4094, 4096 * 3 + 512):
        view = aligned_view(base, 1000, start)
        assert view.numel() == 1000 and (view.data_ptr() - start) % ALIGN == 0
