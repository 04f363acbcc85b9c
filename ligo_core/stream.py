"""Write a grown checkpoint one tensor at a time, without building the grown model.

The large tensors come in spec order: a fixed strategy's made a block of rows at a time, moved
apart and cast into a buffer of the output dtype (ligo_core/rowblocks.py); a fitted LiGO's whole,
in fp32, with its offsets added (``GrowthOperator.iter_fixed``). Each is written at its place in
its shard, from a background thread, while the next is made; written buffers are reused. Shards are
planned up front with huggingface_hub's ``split_torch_state_dict_into_shards`` on meta tensors
(shapes and dtypes, no memory), so every safetensors header is known before any data: each file is
written header first, then tensor by tensor at the header's offsets. Peak memory is about one
source tensor and a few output tensors, whatever the model's size.
"""

from __future__ import annotations

import copy
import json
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from transformers import GenerationConfig, PretrainedConfig

from ligo_core.direct_io import ALIGN, RangeWriter, aligned_view, slack
from ligo_core.families import TensorSpec
from ligo_core.operator import GrowthOperator, stored_axis
from ligo_core.rowblocks import Allocate
from ligo_core.weights import SAFETENSORS_DTYPES

SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
OUTPUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}



def output_dtype(choice: str | None, source: torch.dtype) -> torch.dtype:
    """The dtype to write: the source's ("auto" or None) or a named one."""
    if choice in (None, "auto"):
        return source
    if choice not in OUTPUT_DTYPES:
        from ligo_core.errors import TargetError

        raise TargetError(f"unknown dtype {choice!r}; choose from auto, {', '.join(OUTPUT_DTYPES)}", field="dtype")
    return OUTPUT_DTYPES[choice]


def grown_shapes(operator: GrowthOperator, names: dict[str, str],
                 small_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Every large tensor's stored shape, in the order ``iter_fixed`` yields them, from the small
    shapes and the operator's sizes alone."""
    shapes = {}
    for spec in operator.specs:
        full = names[spec.name]
        small = list(small_shapes[full.format(i=0)])
        for k, dim in enumerate(spec.dims):
            if dim is not None:
                spaces = dim[0].split("+")
                small[stored_axis(spec, k, len(small))] = sum(operator.expanders[s].d2 for s in spaces)
        for layer in range(operator.large_layers if spec.per_layer else 1):
            shapes[full.format(i=layer)] = tuple(small)
    return shapes


class ShardWriter:
    """safetensors shards written tensor by tensor, in any order, at offsets planned up front."""

    QUEUED = 1  # cast tensors waiting for the writing thread: each is memory held

    def __init__(self, directory: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                 max_shard_size: str | int, direct: bool = True):
        metas = {n: torch.empty(s, dtype=dtype, device="meta") for n, s in shapes.items()}
        split = split_torch_state_dict_into_shards(metas, filename_pattern="model{suffix}.safetensors",
                                                   max_shard_size=max_shard_size)
        self.split, self.dtype, self.directory = split, dtype, directory
        self.place: dict[str, tuple[Path, int, int]] = {}  # name -> (file, first byte, end)
        self.pending = set(shapes)
        self._queue: queue.Queue = queue.Queue(maxsize=self.QUEUED)
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        # Output buffers handed back once written (by element count): refilled instead of freed, so
        # the next tensor of that size costs no fresh pages (a fault per 4 KB page, ~3x a copy).
        self._spare: dict[int, list[torch.Tensor]] = {}
        self._lent: dict[int, torch.Tensor] = {}  # storage address -> buffer, while lent or queued
        self._lock = threading.Lock()
        self._files = RangeWriter(direct)  # large tensors straight to the disk (ligo_core/direct_io.py)
        item = torch.empty((), dtype=dtype).element_size()
        for filename, tensors in split.filename_to_tensors.items():
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name in tensors:
                size = item * metas[name].numel()
                header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shapes[name]),
                                "data_offsets": [offset, offset + size]}
                offset += size
            text = json.dumps(header, separators=(",", ":")).encode()
            # The data starts on an ALIGN boundary (8-byte aligned, as safetensors asks): written direct.
            text += b" " * (-(8 + len(text)) % ALIGN)
            path = directory / filename
            with open(path, "wb") as f:
                f.write(len(text).to_bytes(8, "little"))
                f.write(text)
                f.truncate(8 + len(text) + offset)
            for name in tensors:
                start, end = header[name]["data_offsets"]
                self.place[name] = (path, 8 + len(text) + start, 8 + len(text) + end)

    def buffer(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised tensor of the output dtype to fill and ``write`` as ``name``; reused once
        written. Its address sits as its place in the file does, modulo ALIGN, so it is written
        without a copy (``direct_io.aligned_view``)."""
        numel = _numel(shape)
        with self._lock:
            if numel not in self._spare:  # tensors come in runs of one size: the last size's spares go
                self._spare = {numel: []}
            spare = self._spare.get(numel)
            base = spare.pop() if spare else torch.empty(numel + slack(self.dtype), dtype=self.dtype)
            self._lent[base.untyped_storage().data_ptr()] = base
        return aligned_view(base, numel, self.place[name][1]).view(shape)

    def _hand_back(self, data: torch.Tensor) -> None:
        with self._lock:
            buffer = self._lent.pop(data.untyped_storage().data_ptr(), None)
            spare = self._spare.get(buffer.numel() - slack(self.dtype)) if buffer is not None else None
            if spare is not None and len(spare) < self.SPARE:
                spare.append(buffer)

    SPARE = 2  # buffers kept per size: one being filled while one is written

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Cast ``tensor`` and hand it to the writing thread (which holds at most QUEUED of them), so
        the next tensor is computed while the kernel makes this one's pages room on the disk."""
        path, start, end = self.place[name]
        data = tensor.detach()
        if data.untyped_storage().data_ptr() not in self._lent:
            # Not one of this writer's buffers (a fitted operator's fp32 tensor, maybe on a GPU): cast
            # into one, so its memory is aligned for a direct write and refilled afterwards.
            data = self.buffer(name, tuple(data.shape)).copy_(data)
        data = data.contiguous()
        if data.numel() * data.element_size() != end - start:
            raise AssertionError(f"{name}: {data.numel() * data.element_size()} bytes, the header planned "
                                 f"{end - start}")
        if self._thread is None:
            self._thread = threading.Thread(target=self._drain, name="ligo-shard-writer", daemon=True)
            self._thread.start()
        self._raise_failure()
        self._queue.put((path, start, data))
        self.pending.discard(name)

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            path, start, data = item
            try:
                if self._failure is None:
                    self._files.write(path, start, data)
            except BaseException as exc:  # handed to the caller at its next write or at finish
                self._failure = exc
            self._hand_back(data)
            del item, data

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def close(self) -> None:
        """Wait for the writing thread to write what it holds."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def finish(self) -> list[str]:
        """Check every planned tensor was written, write the index when sharded; the file names."""
        self.close()
        self._raise_failure()
        if self.pending:
            raise AssertionError(f"tensors never written: {sorted(self.pending)[:5]}")
        files = list(self.split.filename_to_tensors)
        if self.split.is_sharded:
            index = {"metadata": self.split.metadata, "weight_map": self.split.tensor_to_filename}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            files.append(INDEX_NAME)
        return files


def write_config(directory: Path, config: PretrainedConfig, model_class: type, dtype: torch.dtype) -> None:
    """config.json (and generation_config.json for a generating model) as ``save_pretrained`` writes
    them for the grown model."""
    config = copy.deepcopy(config)
    config.architectures = [model_class.__name__]
    config.dtype = dtype
    config.save_pretrained(directory)
    if model_class.can_generate():
        GenerationConfig.from_model_config(config).save_pretrained(directory)


@torch.no_grad()
def stream_weights(
    directory: Path,
    shapes: dict[str, tuple[int, ...]],
    tensors: Callable[[Allocate], Iterator[tuple[TensorSpec, int, str, torch.Tensor]]],
    *,
    dtype: torch.dtype,
    max_shard_size: str | int = "2GB",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[str], int]:
    """Write the grown weights into ``directory``; returns (file names, parameter count).

    ``shapes``: every tensor's stored shape (``grown_shapes``); ``tensors(allocate)``: the tensors
    in that order, each made in a buffer from ``allocate(name, shape)`` (or any tensor: it is cast)."""
    writer = ShardWriter(directory, shapes, dtype, max_shard_size)
    try:
        for done, (_, _, name, tensor) in enumerate(tensors(writer.buffer), start=1):
            writer.write(name, tensor)
            del tensor
            if progress is not None:
                progress(done, len(shapes))
    finally:
        writer.close()
    return writer.finish(), sum(_numel(s) for s in shapes.values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
