"""Each family's weight matrices as data, and what follows from the sizes alone: parameter
counts and the resolved target's summary (the cost estimate and the memory plan count FLOPs and
bytes from the same list)."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from ligo_core.targets import family_of, sizes_of


@dataclass(frozen=True)
class Shape:
    ffn_inputs: int  # FFN input projections: 1, or 2 for a gated FFN (SwiGLU: gate and up)
    head_transform: bool  # a dense hidden x hidden layer before the LM decoder (BERT, RoBERTa)
    positions: str | None  # config attribute of a learned position table
    token_types: str | None  # config attribute of a token-type table


SHAPES = {
    "gpt2": Shape(1, False, "n_positions", None),
    "bert": Shape(1, True, "max_position_embeddings", "type_vocab_size"),
    "roberta": Shape(1, True, "max_position_embeddings", "type_vocab_size"),
    "llama": Shape(2, False, None, None),
}


def layer_matrices(config: PretrainedConfig) -> list[tuple[int, int]]:
    """(out, in) of every weight matrix of one layer: Q, K, V, O, FFN in (x1 or x2), FFN out."""
    s, shape = sizes_of(config), SHAPES[family_of(config).name]
    h, q, kv, f = s["hidden"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"], s["ffn"]
    return [(q, h), (kv, h), (kv, h), (h, q)] + [(f, h)] * shape.ffn_inputs + [(h, f)]


def global_matrices(config: PretrainedConfig) -> list[tuple[int, int]]:
    """(rows, hidden) of the embedding tables, the head transform and an untied LM head."""
    shape, h = SHAPES[family_of(config).name], sizes_of(config)["hidden"]
    rows = [config.vocab_size] + [getattr(config, a) for a in (shape.positions, shape.token_types) if a]
    mats = [(int(r), h) for r in rows]
    if shape.head_transform:
        mats.append((h, h))
    if not getattr(config, "tie_word_embeddings", True):
        mats.append((config.vocab_size, h))
    return mats


def num_parameters(config: PretrainedConfig) -> int:
    """Weight-matrix and embedding parameters (biases and norm gains, under 0.5%, left out)."""
    layers = sizes_of(config)["layers"]
    return layers * sum(o * i for o, i in layer_matrices(config)) + sum(o * i for o, i in global_matrices(config))


def target_summary(config: PretrainedConfig) -> dict[str, int]:
    """A resolved target's sizes and parameter count, echoed before any work starts."""
    return {**sizes_of(config), "parameters": num_parameters(config)}
