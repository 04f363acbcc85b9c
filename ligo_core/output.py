"""Writing the grown checkpoint: HF layout, safetensors shards, tokenizer, report — all or nothing."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
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


def write_checkpoint(
    model: PreTrainedModel,
    out_dir: str | Path,
    *,
    dtype: torch.dtype,
    source_dir: Path,
    report: dict,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
) -> list[str]:
    """Save into a temporary sibling directory, then rename it into place; returns the file names."""
    out = check_output_dir(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model.to(dtype).save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (source_dir / name).is_file():
                shutil.copy2(source_dir / name, tmp / name)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(p.name for p in out.iterdir())
