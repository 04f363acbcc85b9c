"""Reading a source checkpoint safely: directories or archives, safetensors or weights-only pickles.

Nothing here runs code from the checkpoint: archives are extracted with path and link checks,
``.bin`` files go through ``torch.load(weights_only=True)``, and configs are plain JSON.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from ligo_core.archive import DEFAULT_MAX_EXTRACT_BYTES, extract, is_archive, unsafe_name
from ligo_core.errors import CheckpointError, LigoError
from ligo_core.families import family_for_model_type, supported_model_types
from ligo_core.growth import Layout, load_grown_weights, plan_layout

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "vocab.txt", "tokenizer.model", "added_tokens.json",
)
FOREIGN_WEIGHTS = ("tf_model.h5", "flax_model.msgpack", "model.ckpt.index", "pytorch_model.pt", "model.pt")


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


def _model_root(directory: Path) -> Path:
    """The folder holding config.json: the archive root or its single top-level folder."""
    if (directory / "config.json").is_file():
        return directory
    entries = [p for p in directory.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / "config.json").is_file():
        return entries[0]
    raise CheckpointError("no config.json found at the top of the checkpoint")


@contextlib.contextmanager
def opened_source(src: str | Path, max_bytes: int = DEFAULT_MAX_EXTRACT_BYTES,
                  tmp_dir: str | Path | None = None) -> Iterator[Path]:
    """A directory holding the checkpoint: ``src`` itself, or a temporary extraction of it
    (in ``tmp_dir``, default the system's temp folder)."""
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
    tmp = Path(tempfile.mkdtemp(prefix="ligo-src-", dir=tmp_dir))
    try:
        extract(path, tmp, max_bytes)
        yield _model_root(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_config(directory: Path, follow_links: bool = False) -> PretrainedConfig:
    try:
        data = json.loads(confined(directory, "config.json", "the checkpoint", follow_links).read_text())
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


def _weight_files(directory: Path, follow_links: bool = False) -> tuple[list[Path], str]:
    for index_name, fmt in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "pytorch_bin")):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(confined(directory, index_name, "the checkpoint", follow_links).read_text())["weight_map"]
                entries = list(weight_map.values())
            except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
                raise CheckpointError(f"{index_name} is not a valid shard index ({exc})") from None
            files = []
            for entry in dict.fromkeys(entries):  # each shard once, in the index's order
                f = confined(directory, entry, index_name, follow_links)
                if not f.is_file():
                    raise CheckpointError(f"shard {entry!r} named in {index_name} is missing")
                files.append(f)
            return sorted(files), fmt
    for name, fmt in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "pytorch_bin")):
        if (directory / name).is_file():
            return [confined(directory, name, "the checkpoint", follow_links)], fmt
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


def read_weights(directory: Path, follow_links: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    files, fmt = _weight_files(directory, follow_links)
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


def check_tokenizer_files(directory: Path, follow_links: bool = False) -> list[str]:
    """The tokenizer files present, each confined to the checkpoint, and every file name that
    tokenizer_config.json gives (``*_file`` keys, ``fast_tokenizer_files``) likewise."""
    present = [n for n in TOKENIZER_FILES if (directory / n).is_file() or (directory / n).is_symlink()]
    for name in present:
        confined(directory, name, "the checkpoint", follow_links)
    if "tokenizer_config.json" in present:
        try:
            config = json.loads((directory / "tokenizer_config.json").read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"tokenizer_config.json is not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise CheckpointError("tokenizer_config.json is not a JSON object")
        named = [(k, v) for k, v in config.items() if k.endswith("_file") and v is not None]
        fast = config.get("fast_tokenizer_files") or []
        named += [("fast_tokenizer_files", v) for v in (fast if isinstance(fast, list) else [fast])]
        for key, value in named:
            confined(directory, value, f"tokenizer_config.json's {key}", follow_links)
    return present


def load_tokenizer(directory: Path, follow_links: bool = False):
    if not check_tokenizer_files(directory, follow_links):
        return None
    from transformers import AutoTokenizer

    try:  # a local folder (checked above), never the Hub: no revision to pin (bandit B615)
        return AutoTokenizer.from_pretrained(str(directory))  # nosec B615
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"tokenizer files are present but do not load ({type(exc).__name__}: {exc})") from None


def load_checkpoint(directory: Path, follow_links: bool = False) -> LoadedCheckpoint:
    """Config, validated weights, fp32 model and tokenizer from an opened checkpoint directory.

    ``follow_links``: files may link outside the directory (see ``confined``); never for uploads."""
    config = read_config(directory, follow_links)
    state, fmt = read_weights(directory, follow_links)
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
    return LoadedCheckpoint(model, config, layout, load_tokenizer(directory, follow_links), directory, fmt, dtype)


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


def inspect_checkpoint(src: str | Path, *, follow_links: bool = False) -> dict:
    """Family, config, parameter count and format of a checkpoint (directory or archive)."""
    with opened_source(src) as directory:
        loaded = load_checkpoint(directory, follow_links)
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
