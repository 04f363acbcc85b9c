"""Reading a source checkpoint safely: directories or archives, safetensors or weights-only pickles.

Nothing here runs code from the checkpoint: archives are extracted with path and link checks,
``.bin`` files go through ``torch.load(weights_only=True)``, and configs are plain JSON.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from ligo_core.errors import CheckpointError, LigoError
from ligo_core.families import family_for_model_type, supported_model_types
from ligo_core.growth import Layout, load_grown_weights, plan_layout

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
MAX_ARCHIVE_MEMBERS = 10_000
DEFAULT_MAX_EXTRACT_BYTES = 200 * 2**30
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "vocab.txt", "tokenizer.model", "added_tokens.json",
)
FOREIGN_WEIGHTS = ("tf_model.h5", "flax_model.msgpack", "model.ckpt.index", "pytorch_model.pt", "model.pt")


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _check_member_path(name: str) -> None:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise CheckpointError(f"archive member {name!r} points outside the archive")


def _check_members(members: list[tuple[str, int, str]], max_bytes: int) -> None:
    """Refuse an archive before extracting anything: (name, size, kind) per member."""
    if len(members) > MAX_ARCHIVE_MEMBERS:
        raise CheckpointError(f"archive has {len(members)} members, more than {MAX_ARCHIVE_MEMBERS}")
    total = 0
    for name, size, kind in members:
        _check_member_path(name)
        if kind == "link":
            raise CheckpointError(f"archive member {name!r} is a link; links are not accepted")
        if kind == "other":
            raise CheckpointError(f"archive member {name!r} is not a regular file or directory")
        total += size
        if total > max_bytes:
            raise CheckpointError(f"archive expands to more than {max_bytes} bytes")


def _tar_kind(m: tarfile.TarInfo) -> str:
    return "link" if m.issym() or m.islnk() else "file" if m.isfile() or m.isdir() else "other"


def _extract_tar(path: Path, dest: Path, max_bytes: int) -> None:
    try:
        with tarfile.open(path) as tar:
            _check_members([(m.name, m.size, _tar_kind(m)) for m in tar.getmembers()], max_bytes)
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path.name}: not a readable tar archive ({exc})") from None


def _extract_zip(path: Path, dest: Path, max_bytes: int) -> None:
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


def _model_root(directory: Path) -> Path:
    """The folder holding config.json: the archive root or its single top-level folder."""
    if (directory / "config.json").is_file():
        return directory
    entries = [p for p in directory.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / "config.json").is_file():
        return entries[0]
    raise CheckpointError("no config.json found at the top of the checkpoint")


@contextlib.contextmanager
def opened_source(src: str | Path, max_bytes: int = DEFAULT_MAX_EXTRACT_BYTES) -> Iterator[Path]:
    """A directory holding the checkpoint: ``src`` itself, or a temporary extraction of it."""
    path = Path(src)
    if path.is_dir():
        yield _model_root(path)
        return
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not is_archive(path):
        raise CheckpointError(
            f"{path.name}: unsupported checkpoint file; give a directory or a .tar, .tar.gz or .zip of one"
        )
    tmp = Path(tempfile.mkdtemp(prefix="ligo-src-"))
    try:
        if path.name.lower().endswith(".zip"):
            _extract_zip(path, tmp, max_bytes)
        else:
            _extract_tar(path, tmp, max_bytes)
        yield _model_root(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_config(directory: Path) -> PretrainedConfig:
    try:
        data = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"config.json is not valid JSON ({exc})") from None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if not model_type:
        raise CheckpointError("config.json has no model_type")
    if family_for_model_type(model_type) is None:
        raise CheckpointError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    try:
        return AutoConfig.for_model(**data)
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"config.json is not a valid {model_type} config ({exc})") from None


def _weight_files(directory: Path) -> tuple[list[Path], str]:
    for index_name, fmt in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "pytorch_bin")):
        index = directory / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                raise CheckpointError(f"{index_name} is not a valid shard index ({exc})") from None
            files = [directory / s for s in shards]
            for f in files:
                _check_member_path(f.name)
                if not f.is_file():
                    raise CheckpointError(f"shard {f.name!r} named in {index_name} is missing")
            return files, fmt
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"], "safetensors"
    if (directory / "pytorch_model.bin").is_file():
        return [directory / "pytorch_model.bin"], "pytorch_bin"
    foreign = [n for n in FOREIGN_WEIGHTS if (directory / n).exists()]
    if foreign:
        raise CheckpointError(f"{foreign[0]}: unsupported weight format; convert to model.safetensors")
    raise CheckpointError("no weights found: expected model.safetensors (or shards with an index) or pytorch_model.bin")


def _load_file(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    if fmt == "safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path.name}: corrupt or truncated safetensors file ({exc})") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling raises many types; all mean "refused"
        raise CheckpointError(f"{path.name}: not a loadable weights-only PyTorch file ({type(exc).__name__}: {exc})".split("\n")[0]) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path.name}: does not hold a flat dict of tensors")
    return state


def read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], str]:
    files, fmt = _weight_files(directory)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(_load_file(f, fmt))
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"tensor {name!r} holds NaN or infinite values")
    return state, fmt


def _model_class(config: PretrainedConfig, layout: Layout):
    import transformers

    family = layout.family
    if layout.has_head:
        wanted = [a for a in (config.architectures or []) if a in family.lm_classes]
        name = wanted[0] if wanted else next(
            (c for c in family.lm_classes if c.lower().startswith(config.model_type)), family.lm_classes[0]
        )
    else:
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

        name = MODEL_MAPPING_NAMES[config.model_type]
    return getattr(transformers, name)


@dataclass
class LoadedCheckpoint:
    model: PreTrainedModel
    config: PretrainedConfig
    layout: Layout
    tokenizer: object | None
    directory: Path
    format: str
    dtype: torch.dtype


def _dtype_of(state: dict[str, torch.Tensor]) -> torch.dtype:
    floats = [t.dtype for t in state.values() if t.is_floating_point()]
    return max(set(floats), key=floats.count) if floats else torch.float32


def load_tokenizer(directory: Path):
    if not any((directory / n).is_file() for n in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"tokenizer files are present but do not load ({type(exc).__name__}: {exc})") from None


def load_checkpoint(directory: Path) -> LoadedCheckpoint:
    """Config, validated weights, fp32 model and tokenizer from an opened checkpoint directory."""
    config = read_config(directory)
    state, fmt = read_weights(directory)
    try:
        layout = plan_layout(config, {k: tuple(v.shape) for k, v in state.items()})
    except LigoError as exc:
        raise CheckpointError(str(exc)) from None
    dtype = _dtype_of(state)
    cls = _model_class(config, layout)
    with torch.device("meta"):
        model = cls(config)
    keep = {k: v.float() if v.is_floating_point() else v for k, v in state.items() if k not in layout.dropped}
    del state
    _materialise_buffers(model, cls, config)
    model = load_grown_weights(model, keep)
    model.eval()
    return LoadedCheckpoint(model, config, layout, load_tokenizer(directory), directory, fmt, dtype)


def _materialise_buffers(model: PreTrainedModel, cls, config: PretrainedConfig) -> None:
    """Meta-built models lack buffer values (rotary frequencies, position ids): take them
    from a one-layer CPU copy of the same config, whose buffers are the same."""
    small = config.__class__.from_dict(config.to_dict())
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(small, key):
            setattr(small, key, 1)
    if isinstance(getattr(small, "layer_types", None), list):
        small.layer_types = small.layer_types[:1]
    donor = dict(cls(small).named_buffers())
    for name, _ in list(model.named_buffers()):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        source = donor.get(name) if name in donor else donor.get(_first_layer(name))
        if source is None:
            raise AssertionError(f"no value for buffer {name}")
        module._buffers[attr] = source.clone()


def _first_layer(name: str) -> str:
    import re

    return re.sub(r"\.(\d+)\.", ".0.", name, count=1)


def inspect_checkpoint(src: str | Path) -> dict:
    """Family, config, parameter count and format of a checkpoint (directory or archive)."""
    with opened_source(src) as directory:
        loaded = load_checkpoint(directory)
        params = sum(p.numel() for p in loaded.model.parameters())
        return {
            "family": loaded.layout.family.name,
            "model_type": loaded.config.model_type,
            "architectures": [type(loaded.model).__name__],
            "config": loaded.config.to_dict(),
            "num_parameters": int(params),
            "has_lm_head": loaded.layout.has_head,
            "has_tokenizer": loaded.tokenizer is not None,
            "format": loaded.format,
            "dtype": str(loaded.dtype).replace("torch.", ""),
            "dropped_tensors": loaded.layout.dropped,
        }
