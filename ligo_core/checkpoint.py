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
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from ligo_core.archive import DEFAULT_MAX_EXTRACT_BYTES, TOKENIZER_FILES, confined, extract, is_archive
from ligo_core.errors import CheckpointError, LigoError
from ligo_core.families import family_for_model_type, supported_model_types
from ligo_core.growth import Layout, load_grown_weights, plan_layout
from ligo_core.targets import sizes_of
from ligo_core.weights import FOREIGN_WEIGHTS, LazyWeights, open_weights  # noqa: F401 - FOREIGN_WEIGHTS re-exported

MAX_JSON_BYTES = 4 * 2**20  # config.json and tokenizer_config.json: a few KB in practice
MAX_TOKENIZER_BYTES = 128 * 2**20  # the largest real tokenizer files are tens of MB
# Sizes a config may claim before anything is read for it: far above any real model, far below
# what would exhaust a validator (the weights' own shapes are checked against the config too).
SIZE_BOUNDS = {"layers": 1024, "hidden": 65_536, "heads": 1024, "kv_heads": 1024, "ffn": 1_048_576,
               "head_dim": 4096, "vocab_size": 4_194_304, "positions": 1_048_576}


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


def read_json(directory: Path, name: str, follow_links: bool = False):
    path = confined(directory, name, "the checkpoint", follow_links)
    if path.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{name} is larger than {MAX_JSON_BYTES} bytes")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{name} is not valid JSON ({exc})") from None


def read_config(directory: Path, follow_links: bool = False) -> PretrainedConfig:
    data = read_json(directory, "config.json", follow_links)
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if not model_type:
        raise CheckpointError("config.json has no model_type")
    if family_for_model_type(model_type) is None:
        raise CheckpointError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    check_config_sizes(data)
    try:
        config = AutoConfig.for_model(**data)
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"config.json is not a valid {model_type} config ({exc})") from None
    check_config_sizes(config)
    return config


def check_config_sizes(config) -> None:
    """Every size a config claims is a positive whole number within SIZE_BOUNDS, named if not.

    ``config``: the raw config.json dict (checked before transformers builds anything from it:
    Qwen2's config makes a list with an entry per layer) or the built config (derived sizes)."""
    raw = isinstance(config, dict)
    get = config.get if raw else (lambda key: getattr(config, key, None))
    family = family_for_model_type(get("model_type"))
    positions = "n_positions" if get("n_positions") is not None else "max_position_embeddings"
    for field, key in {**family.config_keys, "vocab_size": "vocab_size", "positions": positions}.items():
        value = get(key)
        if value is None:
            continue  # derived (GPT-2's n_inner, a default head_dim)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"config.json: {key} must be a positive whole number, got {value!r}")
        if value > SIZE_BOUNDS[field]:
            raise CheckpointError(f"config.json: {key}={value} is above the limit of {SIZE_BOUNDS[field]}")
    if raw:
        return
    try:
        sizes_of(config)
    except (ZeroDivisionError, TypeError, ValueError) as exc:
        raise CheckpointError(f"config.json: sizes do not fit together ({exc})") from None


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


def _dtype_of(dtypes: dict[str, torch.dtype]) -> torch.dtype:
    floats = [d for d in dtypes.values() if d.is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32


def check_tokenizer_files(directory: Path, follow_links: bool = False) -> list[str]:
    """The tokenizer files present, each confined to the checkpoint, and every file name that
    tokenizer_config.json gives (``*_file`` keys, ``fast_tokenizer_files``) likewise."""
    present = [n for n in TOKENIZER_FILES if (directory / n).is_file() or (directory / n).is_symlink()]
    for name in present:
        confined(directory, name, "the checkpoint", follow_links)
    for name in present:
        if (directory / name).stat().st_size > MAX_TOKENIZER_BYTES:
            raise CheckpointError(f"{name} is larger than {MAX_TOKENIZER_BYTES} bytes")
    if "tokenizer_config.json" in present:
        config = read_json(directory, "tokenizer_config.json", follow_links)
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


@dataclass
class CheckedCheckpoint:
    """A checkpoint whose config and weight headers agree, before any tensor is read."""

    config: PretrainedConfig
    layout: Layout
    weights: LazyWeights  # open: close it (or use ``checked_checkpoint``)
    model_class: type
    num_parameters: int

    @property
    def dtype(self) -> torch.dtype:
        return _dtype_of(self.weights.dtypes)


def check_checkpoint(directory: Path, follow_links: bool = False) -> CheckedCheckpoint:
    """Config and weights checked against each other from the headers alone: every tensor the
    family needs is there with the shape the config implies, and so is every parameter of the
    model class (built on the meta device, which allocates nothing)."""
    config = read_config(directory, follow_links)
    weights = open_weights(directory, follow_links)
    try:
        try:
            layout = plan_layout(config, weights.shapes)
        except LigoError as exc:
            raise CheckpointError(str(exc)) from None
        cls = _model_class(config, layout)
        with torch.device("meta"):
            model = cls(config)
        count = 0
        for name, p in model.named_parameters():  # tied parameters appear once
            if name not in weights.shapes:
                raise CheckpointError(f"tensor {name!r} is missing: the weights do not match the config")
            if tuple(p.shape) != weights.shapes[name]:
                raise CheckpointError(f"tensor {name!r} has shape {weights.shapes[name]}, but the config "
                                      f"implies {tuple(p.shape)}")
            count += p.numel()
        return CheckedCheckpoint(config, layout, weights, cls, count)
    except BaseException:
        weights.close()
        raise


def load_checkpoint(directory: Path, follow_links: bool = False) -> LoadedCheckpoint:
    """Config, validated weights, fp32 model and tokenizer from an opened checkpoint directory.

    The config and the weights' headers are checked against each other before any tensor is
    read. ``follow_links``: files may link outside the directory (see ``confined``); never for
    uploads."""
    checked = check_checkpoint(directory, follow_links)
    with checked.weights as weights:
        config, layout, cls = checked.config, checked.layout, checked.model_class
        with torch.device("meta"):
            model = cls(config)
        keep = {}
        for name in weights.shapes:
            if name in layout.dropped:
                continue
            tensor = weights.get(name)
            if tensor.is_floating_point():
                if not torch.isfinite(tensor).all():
                    raise CheckpointError(f"tensor {name!r} holds NaN or infinite values")
                tensor = tensor.float()
            keep[name] = tensor
        _materialise_buffers(model, cls, config)
        model = load_grown_weights(model, keep)
        model.eval()
        return LoadedCheckpoint(model, config, layout, load_tokenizer(directory, follow_links), directory,
                                weights.format, checked.dtype)


def _materialise_buffers(model: PreTrainedModel, cls, config: PretrainedConfig) -> None:
    """Meta-built models lack buffer values (rotary frequencies, position ids): take them
    from a one-layer CPU copy of the same config, whose buffers are the same."""
    small = config.__class__.from_dict(config.to_dict())
    keys = family_for_model_type(config.model_type).config_keys
    # Buffers depend on positions and head sizes only: one layer, a token vocabulary and a tiny
    # FFN keep the donor small whatever the model's size.
    for key, value in ((keys["layers"], 1), ("vocab_size", 8), (keys["ffn"], 8)):
        setattr(small, key, value)
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
    """Family, config, parameter count and format of a checkpoint (directory or archive).

    Reads headers, not tensors: no model is built, and the NaN scan reads one slice of one tensor
    at a time, so the memory used does not grow with the checkpoint's size or its config's claims."""
    with opened_source(src) as directory:
        checked = check_checkpoint(directory, follow_links)
        with checked.weights as weights:
            weights.check_finite()
        tokenizer = load_tokenizer(directory, follow_links)
        config, layout = checked.config, checked.layout
        return {
            "family": layout.family.name,
            "model_type": config.model_type,
            "architectures": [checked.model_class.__name__],
            "config": config.to_dict(),
            "num_parameters": int(checked.num_parameters),
            "has_lm_head": layout.has_head,
            "has_tokenizer": tokenizer is not None,
            "format": weights.format,
            "dtype": str(checked.dtype).replace("torch.", ""),
            "dropped_tensors": layout.dropped,
        }
