"""Writing the grown checkpoint: HF layout, safetensors shards, tokenizer, report — all or nothing."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import PreTrainedModel

from ligo_core.archive import TOKENIZER_FILES
from ligo_core.errors import LigoError

DEFAULT_MAX_SHARD_SIZE = "2GB"
REPORT_NAME = "growth_report.json"


def check_output_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LigoError(f"output {str(out)!r} exists and is not an empty directory")
    return out


@contextlib.contextmanager
def staged_output(out_dir: str | Path) -> Iterator[Path]:
    """A temporary sibling directory to write into, renamed to ``out_dir`` when the block ends
    without an error and removed when it does not: the output appears whole or not at all."""
    out = check_output_dir(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_side_files(directory: Path, source_dir: Path, report: dict) -> None:
    """The tokenizer files of the source, and the growth report."""
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, directory / name)
    (directory / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")


def write_checkpoint(
    model: PreTrainedModel,
    out_dir: str | Path,
    *,
    dtype: torch.dtype,
    source_dir: Path,
    report: dict,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
) -> list[str]:
    """Save a model built in memory; returns the file names. (Growth without a model in memory
    writes tensor by tensor: ligo_core/stream.py.)"""
    with staged_output(out_dir) as tmp:
        model.to(dtype).save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        write_side_files(tmp, source_dir, report)
    return sorted(p.name for p in Path(out_dir).iterdir())
