"""A checkpoint's weight files, read lazily: names, shapes and dtypes from the headers, tensors one
at a time through memory maps.

Nothing is allocated for a tensor until it is asked for, so a checkpoint can be checked against
its config (``ligo_core.growth.plan_layout``) before any memory is spent on it, and scanned for
NaN, or grown, one tensor at a time. safetensors files are read with ``safe_open`` (which also
refuses truncated files); ``.bin`` files with ``torch.load(weights_only=True, mmap=True)``.
"""

from __future__ import annotations

import contextlib
import json
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ligo_core.archive import confined
from ligo_core.errors import CheckpointError

FOREIGN_WEIGHTS = ("tf_model.h5", "flax_model.msgpack", "model.ckpt.index", "pytorch_model.pt", "model.pt")
INDEXES = (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "pytorch_bin"))
SINGLE_FILES = (("model.safetensors", "safetensors"), ("pytorch_model.bin", "pytorch_bin"))
MAX_INDEX_BYTES = 64 * 2**20  # an index of 10^5 tensors is a few MB
SCAN_CHUNK = 2**24  # elements read at once when scanning a tensor for NaN (64 MiB of fp32)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def weight_files(directory: Path, follow_links: bool = False) -> tuple[list[Path], str]:
    """The weight files of a checkpoint directory and their format ("safetensors" or "pytorch_bin"):
    the shards its index names (each confined to the directory), or the single file."""
    for index_name, fmt in INDEXES:
        index = directory / index_name
        if not index.is_file():
            continue
        path = confined(directory, index_name, "the checkpoint", follow_links)
        if path.stat().st_size > MAX_INDEX_BYTES:
            raise CheckpointError(f"{index_name} is larger than {MAX_INDEX_BYTES} bytes")
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
            entries = list(weight_map.values())
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
            raise CheckpointError(f"{index_name} is not a valid shard index ({exc})") from None
        files = []
        for entry in dict.fromkeys(entries):  # each shard once
            f = confined(directory, entry, index_name, follow_links)
            if not f.is_file():
                raise CheckpointError(f"shard {entry!r} named in {index_name} is missing")
            files.append(f)
        if not files:
            raise CheckpointError(f"{index_name} names no shards")
        return sorted(files), fmt
    for name, fmt in SINGLE_FILES:
        if (directory / name).is_file():
            return [confined(directory, name, "the checkpoint", follow_links)], fmt
    foreign = [n for n in FOREIGN_WEIGHTS if (directory / n).exists()]
    if foreign:
        raise CheckpointError(f"{foreign[0]}: unsupported weight format; convert to model.safetensors")
    raise CheckpointError("no weights found: expected model.safetensors (or shards with an index) or pytorch_model.bin")


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".split("\n")[0]


class LazyWeights:
    """Every tensor of a checkpoint by name, read on demand. Use as a context manager (it holds
    the files open); ``shapes`` and ``dtypes`` come from the headers alone."""

    def __init__(self, files: list[Path], fmt: str):
        self.format = fmt
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self._where: dict[str, object] = {}  # name -> open safetensors handle, or the mmap'd tensor
        self._extent: dict[str, tuple[Path, int, int]] = {}  # safetensors: name -> (file, first byte, end)
        self._stack = contextlib.ExitStack()
        try:
            for f in files:
                self._open(f)
        except BaseException:
            self._stack.close()
            raise

    def _add(self, path: Path, name: str, shape, dtype: torch.dtype, where) -> None:
        if name in self._where:
            raise CheckpointError(f"tensor {name!r} appears twice ({path.name} and an earlier file)")
        self.shapes[name], self.dtypes[name], self._where[name] = tuple(int(d) for d in shape), dtype, where

    def _open(self, path: Path) -> None:
        if self.format == "safetensors":
            try:
                handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    dtype = SAFETENSORS_DTYPES.get(piece.get_dtype())
                    if dtype is None:
                        raise CheckpointError(f"tensor {name!r} has unsupported dtype {piece.get_dtype()}")
                    self._add(path, name, piece.get_shape(), dtype, handle)
                self._extent.update(_data_extents(path, handle.keys()))
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"{path.name}: corrupt or truncated safetensors file ({_first_line(exc)})") from None
            return
        state = _load_pickle(path)
        for name, tensor in state.items():
            self._add(path, name, tensor.shape, tensor.dtype, tensor)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, in its stored dtype, owning its memory.

        safetensors tensors are read with plain file reads at the header's offsets, not through
        the memory map: pages touched through a map stay in the process's resident set until the
        file is closed, so growing a checkpoint would hold the whole source by the end."""
        where = self._where[name]
        if isinstance(where, torch.Tensor):
            return where.clone()
        if name in self._extent:
            return self._read(name)
        try:
            return where.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"tensor {name!r}: cannot be read ({_first_line(exc)})") from None

    def _read(self, name: str) -> torch.Tensor:
        path, start, end = self._extent[name]
        shape, dtype = self.shapes[name], self.dtypes[name]
        if start == end:
            return torch.empty(shape, dtype=dtype)
        data = torch.empty(end - start, dtype=torch.uint8)  # not a bytearray: no zeroing of what is read over
        try:
            with open(path, "rb") as f:
                f.seek(start)
                if f.readinto(memoryview(data.numpy())) != end - start:
                    raise OSError("file ends early")
        except OSError as exc:
            raise CheckpointError(f"tensor {name!r}: cannot be read ({_first_line(exc)})") from None
        return data.view(dtype).reshape(shape)

    def chunks(self, name: str, max_elements: int = SCAN_CHUNK) -> Iterator[torch.Tensor]:
        """A tensor in slices along its first dimension, each at most about ``max_elements``."""
        shape, where = self.shapes[name], self._where[name]
        if not shape:
            yield self.get(name)
            return
        rows_per = max(1, max_elements // max(1, _numel(shape[1:])))
        for start in range(0, shape[0], rows_per):
            if isinstance(where, torch.Tensor):
                yield where[start : start + rows_per]
            else:
                yield where.get_slice(name)[start : start + rows_per]

    def check_finite(self) -> None:
        """Refuse NaN or infinite weights, reading one slice of one tensor at a time."""
        for name, dtype in self.dtypes.items():
            if dtype.is_floating_point and any(not torch.isfinite(c).all() for c in self.chunks(name)):
                raise CheckpointError(f"tensor {name!r} holds NaN or infinite values")

    def numel(self, name: str) -> int:
        return _numel(self.shapes[name])

    def close(self) -> None:
        self._stack.close()
        self._where.clear()

    def __enter__(self) -> LazyWeights:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _data_extents(path: Path, names) -> dict[str, tuple[Path, int, int]]:
    """Where each tensor's bytes lie in a safetensors file (``safe_open`` has checked the header)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    base = 8 + size
    return {n: (path, base + header[n]["data_offsets"][0], base + header[n]["data_offsets"][1]) for n in names}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A weights-only pickle, memory-mapped where its format allows (the zip format since torch 1.6)."""
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy format
    except Exception as exc:  # noqa: BLE001 - unpickling raises many types; all mean "refused"
        raise CheckpointError(f"{path.name}: not a loadable weights-only PyTorch file ({_first_line(exc)})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path.name}: does not hold a flat dict of tensors")
    return state


def open_weights(directory: Path, follow_links: bool = False) -> LazyWeights:
    return LazyWeights(*weight_files(directory, follow_links))


class ReadCache:
    """Tensors by name, read once while they fit ``budget`` bytes (least recently used first out): a
    stacked grow reads every small layer once per copy, and a read costs about as much as the work
    done with it. Each tensor is checked finite on its first read."""

    def __init__(self, read: Callable[[str], torch.Tensor], budget: int):
        self._read, self.budget = read, budget
        self._kept: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._checked: set[str] = set()

    def __call__(self, name: str) -> torch.Tensor:
        if name in self._kept:
            self._kept.move_to_end(name)
            return self._kept[name]
        tensor = self._read(name)
        if name not in self._checked:
            # A finite sum means finite entries (one pass, no mask); one that overflowed is checked entry by entry.
            if tensor.is_floating_point() and not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
                raise CheckpointError(f"tensor {name!r} holds NaN or infinite values")
            self._checked.add(name)
        size = _nbytes(tensor)
        if size <= self.budget:
            while self._bytes + size > self.budget:
                self._bytes -= _nbytes(self._kept.popitem(last=False)[1])
            self._kept[name] = tensor
            self._bytes += size
        return tensor


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
