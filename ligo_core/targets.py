"""Target architectures: named presets, HF config files, or ``field=value`` lists.

A target only names sizes (layers, hidden, heads, kv_heads, ffn, head_dim); everything else
(vocabulary, positions, activation, norm epsilon) comes from the source config, so that the
grown model is the same kind of model, only larger.

A ``TargetError``'s ``field`` names what it is about: a size field (``layers``, ``hidden``, ...),
``family``, a config key (``model_type``, ``vocab_size``, ``n_positions``, ...), or the unknown
key a field list gave.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from ligo_core.errors import TargetError
from ligo_core.families import FAMILIES, Family, config_sizes, family_for_model_type

SIZE_FIELDS = ("layers", "hidden", "heads", "kv_heads", "ffn", "head_dim")
FIELD_ALIASES = {
    "layers": "layers", "n_layer": "layers", "num_hidden_layers": "layers", "depth": "layers",
    "hidden": "hidden", "hidden_size": "hidden", "n_embd": "hidden", "width": "hidden", "d_model": "hidden",
    "heads": "heads", "n_head": "heads", "num_attention_heads": "heads",
    "kv_heads": "kv_heads", "num_key_value_heads": "kv_heads", "kv": "kv_heads",
    "ffn": "ffn", "intermediate_size": "ffn", "n_inner": "ffn", "intermediate": "ffn",
    "head_dim": "head_dim",
    "family": "family", "model_type": "family",
}


@dataclass(frozen=True)
class Preset:
    name: str
    model_type: str
    layers: int
    hidden: int
    heads: int
    ffn: int
    kv_heads: int | None = None
    vocab: int | None = None
    note: str = ""


# The paper's models (Wang et al. 2023, Table 1) and common Llama-family sizes.
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("bert-small", "bert", 6, 512, 8, 2048, vocab=30522, note="LiGO paper's BERT-Small"),
        Preset("bert-base", "bert", 12, 768, 12, 3072, vocab=30522),
        Preset("bert-large", "bert", 24, 1024, 16, 4096, vocab=30522),
        Preset("roberta-small", "roberta", 6, 512, 8, 2048, vocab=50265, note="LiGO paper's RoBERTa-Small"),
        Preset("roberta-base", "roberta", 12, 768, 12, 3072, vocab=50265),
        Preset("roberta-large", "roberta", 24, 1024, 16, 4096, vocab=50265),
        Preset("gpt2", "gpt2", 12, 768, 12, 3072, vocab=50257, note="GPT2-Base, 124M"),
        Preset("gpt2-medium", "gpt2", 24, 1024, 16, 4096, vocab=50257, note="345M"),
        Preset("gpt2-large", "gpt2", 36, 1280, 20, 5120, vocab=50257, note="774M"),
        Preset("gpt2-xl", "gpt2", 48, 1600, 25, 6400, vocab=50257, note="1.5B"),
        Preset("tinyllama-1.1b", "llama", 22, 2048, 32, 5632, kv_heads=4, vocab=32000),
        Preset("llama-3.2-1b", "llama", 16, 2048, 32, 8192, kv_heads=8, vocab=128256),
        Preset("llama-3.2-3b", "llama", 28, 3072, 24, 8192, kv_heads=8, vocab=128256),
        Preset("llama-3.1-8b", "llama", 32, 4096, 32, 14336, kv_heads=8, vocab=128256),
        Preset("llama-2-7b", "llama", 32, 4096, 32, 11008, kv_heads=32, vocab=32000),
        Preset("mistral-7b", "mistral", 32, 4096, 32, 14336, kv_heads=8, vocab=32000),
        Preset("qwen2-0.5b", "qwen2", 24, 896, 14, 4864, kv_heads=2, vocab=151936),
        Preset("qwen2-1.5b", "qwen2", 28, 1536, 12, 8960, kv_heads=2, vocab=151936),
        Preset("qwen2-7b", "qwen2", 28, 3584, 28, 18944, kv_heads=4, vocab=152064),
    )
}


def family_of(config: PretrainedConfig) -> Family:
    family = family_for_model_type(getattr(config, "model_type", ""))
    if family is None:
        supported = ", ".join(sorted(t for f in FAMILIES for t in f.model_types))
        raise TargetError(f"unsupported model_type {config.model_type!r}; supported: {supported}", field="model_type")
    return family


def sizes_of(config: PretrainedConfig) -> dict[str, int]:
    """The size fields of a config, with derived values (GPT-2's n_inner=None is 4 x hidden)."""
    return config_sizes(family_of(config), lambda key: getattr(config, key, None))


def parse_fields(text: str) -> dict[str, Any]:
    """``layers=12,hidden=768`` -> {"layers": 12, "hidden": 768}."""
    fields: dict[str, Any] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise TargetError(f"target field {part!r} is not of the form name=value")
        key, value = (s.strip() for s in part.split("=", 1))
        name = FIELD_ALIASES.get(key.lower())
        if name is None:
            raise TargetError(f"unknown target field {key!r}; known: {', '.join(SIZE_FIELDS)}, family", field=key)
        if name == "family":
            fields[name] = value
            continue
        try:
            fields[name] = int(value)
        except ValueError:
            raise TargetError(f"target field {key!r} must be a whole number, got {value!r}", field=name) from None
        if fields[name] <= 0:
            raise TargetError(f"target field {key!r} must be positive, got {value}", field=name)
    return fields


def _base_config(model_type: str, vocab: int | None = None) -> PretrainedConfig:
    config = AutoConfig.for_model(model_type)
    if vocab:
        config.vocab_size = vocab
    return config


def _apply_sizes(config: PretrainedConfig, sizes: dict[str, int]) -> PretrainedConfig:
    family = family_of(config)
    out = copy.deepcopy(config)
    for field_name, key in family.config_keys.items():
        if field_name in sizes and sizes[field_name] is not None:
            setattr(out, key, int(sizes[field_name]))
    old_layers, new_layers = getattr(config, family.config_keys["layers"]), getattr(out, family.config_keys["layers"])
    if isinstance(getattr(out, "layer_types", None), list) and len(out.layer_types) == old_layers:
        # Per-layer attention kinds (Qwen2's sliding windows) follow the layer each new one comes from.
        out.layer_types = [config.layer_types[i * old_layers // new_layers] for i in range(new_layers)]
    if "head_dim" in family.config_keys and "head_dim" not in sizes:
        out.head_dim = out.hidden_size // out.num_attention_heads
    if "kv_heads" in family.config_keys and "kv_heads" not in sizes:
        setattr(out, family.config_keys["kv_heads"], getattr(out, family.config_keys["heads"]))
    return out


def _spec_sizes(spec: Any) -> tuple[dict[str, Any], PretrainedConfig | None, str | None]:
    """Turn a target spec into (size fields, full config if one was given, model_type hint)."""
    if isinstance(spec, PretrainedConfig):
        return sizes_of(spec), spec, spec.model_type
    if isinstance(spec, dict):
        if "model_type" in spec and any(k in spec for k in ("hidden_size", "n_embd")):
            config = AutoConfig.for_model(**spec)
            return sizes_of(config), config, config.model_type
        fields = parse_fields(",".join(f"{k}={v}" for k, v in spec.items()))
        return fields, None, fields.pop("family", None)
    text = str(spec).strip()
    if not text:
        raise TargetError("target is empty: give a preset name, a config.json path, or fields")
    if text in PRESETS:
        p = PRESETS[text]
        sizes = {"layers": p.layers, "hidden": p.hidden, "heads": p.heads, "ffn": p.ffn}
        if p.kv_heads:
            sizes["kv_heads"] = p.kv_heads
        return sizes, None, p.model_type
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.name == "config.json":
        if not path.is_file():
            raise TargetError(f"target config file {str(path)!r} does not exist")
        try:
            data = json.loads(path.read_text())
            config = AutoConfig.for_model(**data)
        except (ValueError, KeyError, TypeError) as exc:
            raise TargetError(f"target config {str(path)!r} is not a valid HF config: {exc}") from None
        return sizes_of(config), config, config.model_type
    if "=" in text:
        fields = parse_fields(text)
        return fields, None, fields.pop("family", None)
    raise TargetError(
        f"unknown target {text!r}: not a preset ({', '.join(sorted(PRESETS))}), "
        "not a config.json path, and not fields like layers=12,hidden=768"
    )


def resolve_target(spec: Any, source: PretrainedConfig | None = None) -> PretrainedConfig:
    """The large model's full config for a target spec, grown from ``source`` if given.

    Without a source (cost estimates from configs alone) a preset or full config stands alone,
    and a field list needs ``family=...``. With one, fields left out keep the source's value, or
    its proportion where it follows the width: ``hidden=128`` from a 64-wide GPT-2 with a 256 FFN
    gives a 512 FFN and heads of the source's size.
    """
    sizes, full, model_type = _spec_sizes(spec)
    if source is None:
        if full is not None:
            return validate_config(full)
        if model_type is None:
            raise TargetError("target fields need family=NAME (gpt2, bert, roberta, llama, ...) without a source",
                              field="family")
        if family_for_model_type(model_type) is None:
            raise TargetError(f"unknown family {model_type!r}", field="family")
        preset_vocab = PRESETS[spec].vocab if isinstance(spec, str) and spec in PRESETS else None
        base = _base_config(model_type, preset_vocab)
        return validate_config(_apply_sizes(base, sizes))

    src_family = family_of(source)
    if model_type is not None and family_for_model_type(model_type) is not src_family:
        raise TargetError(f"target family {model_type!r} does not match the source's {source.model_type!r}",
                          field="family")
    if full is not None:
        if full.vocab_size != source.vocab_size:
            raise TargetError(f"vocab_size: target has {full.vocab_size}, source has {source.vocab_size}",
                              field="vocab_size")
        target = _apply_sizes(source, sizes_of(full))
    else:
        unknown = [k for k in sizes if k not in src_family.config_keys]
        if unknown == ["kv_heads"] and sizes["kv_heads"] == sizes.get("heads"):
            sizes = {k: v for k, v in sizes.items() if k != "kv_heads"}
        elif unknown:
            raise TargetError(f"field {unknown[0]!r} does not apply to the {src_family.name} family", field=unknown[0])
        src = sizes_of(source)
        merged = {**src, **sizes}
        # Fields left out keep the source's proportions: the FFN its multiple of the width
        # (GPT-2's 4x), the heads their size, the KV heads their grouping.
        if "hidden" in sizes and "ffn" not in sizes:
            merged["ffn"] = round(src["ffn"] * merged["hidden"] / src["hidden"])
        if "hidden" in sizes and "head_dim" not in sizes and "heads" in sizes:
            merged["head_dim"] = merged["hidden"] // merged["heads"]
        elif "hidden" in sizes and "heads" not in sizes and "head_dim" not in sizes:
            if merged["hidden"] % src["head_dim"] and "head_dim" not in src_family.config_keys:
                raise TargetError(f"hidden={merged['hidden']} is not a multiple of the source's head size "
                                  f"{src['head_dim']}: give heads= too", field="hidden")
            merged["heads"] = merged["hidden"] // src["head_dim"]
            merged["head_dim"] = src["head_dim"]
        if "kv_heads" not in sizes and "kv_heads" in src_family.config_keys and merged["heads"] != src["heads"]:
            group = src["heads"] // src["kv_heads"]  # query heads per KV head
            merged["kv_heads"] = max(src["kv_heads"], merged["heads"] // group)
        if "head_dim" not in src_family.config_keys:
            merged.pop("head_dim", None)
        if "kv_heads" not in src_family.config_keys:
            merged.pop("kv_heads", None)
        target = _apply_sizes(source, merged)
    validate_config(target)
    check_growth(source, target)
    return target


def max_positions(config: PretrainedConfig) -> int:
    """The longest sequence the model takes (2048 when its config does not say): the fitting's
    sequence length, and an estimate's, is capped at it."""
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048)


def describe_sizes(summary: dict[str, int]) -> str:
    """One line: ``layers 4, hidden 128, heads 8, kv_heads 8, ffn 512, head_dim 16, parameters 1,234,567``."""
    return ", ".join(f"{k} {v:,}" if k == "parameters" else f"{k} {v}" for k, v in summary.items())


def validate_config(config: PretrainedConfig) -> PretrainedConfig:
    """Refuse configs whose sizes do not fit together, naming the field."""
    family = family_of(config)
    keys = family.config_keys
    s = sizes_of(config)
    if "head_dim" not in keys and s["hidden"] % s["heads"]:
        raise TargetError(f"{keys['hidden']}={s['hidden']} is not divisible by {keys['heads']}={s['heads']}",
                          field="hidden")
    if "head_dim" in keys and getattr(config, "head_dim", None) is None:
        config.head_dim = s["hidden"] // s["heads"]
    if s["heads"] % s["kv_heads"]:
        raise TargetError(f"{keys['heads']}={s['heads']} is not divisible by {keys['kv_heads']}={s['kv_heads']}",
                          field="heads")
    if family.rotary and s["head_dim"] % 2:
        raise TargetError(f"head_dim={s['head_dim']} must be even for rotary positions", field="head_dim")
    return config


def check_growth(source: PretrainedConfig, target: PretrainedConfig) -> None:
    """A target may only grow: every size at least the source's, the rest identical."""
    if family_of(source) is not family_of(target):
        raise TargetError(f"model_type: target is {target.model_type!r}, source is {source.model_type!r}",
                          field="model_type")
    keys = family_of(source).config_keys
    a, b = sizes_of(source), sizes_of(target)
    for field_name in SIZE_FIELDS:
        if b[field_name] < a[field_name]:
            key = keys.get(field_name, field_name)
            raise TargetError(
                f"{key}: target {b[field_name]} is smaller than the source's {a[field_name]}; growth cannot shrink",
                field=field_name,
            )
    if target.vocab_size != source.vocab_size:
        raise TargetError(f"vocab_size: target has {target.vocab_size}, source has {source.vocab_size}",
                          field="vocab_size")
    for key in ("max_position_embeddings", "n_positions"):
        if getattr(source, key, None) != getattr(target, key, None):
            raise TargetError(f"{key}: target {getattr(target, key, None)} differs from the source's "
                              f"{getattr(source, key, None)}", field=key)
    if a == b:
        raise TargetError("target has the same sizes as the source: nothing to grow")
