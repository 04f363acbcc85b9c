"""A config's weight matrices and what follows from the sizes alone: parameter counts and the
resolved target's summary. The matrices themselves are data in ligo_core/families.py (the cost
estimate and the memory plan count FLOPs and bytes from the same list)."""

from __future__ import annotations

from transformers import PretrainedConfig

from ligo_core.families import global_matrices_of, layer_matrices_of
from ligo_core.targets import family_of, sizes_of


def layer_matrices(config: PretrainedConfig) -> list[tuple[int, int]]:
    """(out, in) of every weight matrix of one layer: Q, K, V, O, FFN in (x1 or x2), FFN out."""
    return layer_matrices_of(family_of(config), sizes_of(config))


def global_matrices(config: PretrainedConfig) -> list[tuple[int, int]]:
    """(rows, hidden) of the embedding tables, the head transform and an untied LM head."""
    return global_matrices_of(family_of(config), sizes_of(config), lambda key: getattr(config, key, None))


def num_parameters(config: PretrainedConfig) -> int:
    """Weight-matrix and embedding parameters (biases and norm gains, under 0.5%, left out)."""
    layers = sizes_of(config)["layers"]
    return layers * sum(o * i for o, i in layer_matrices(config)) + sum(o * i for o, i in global_matrices(config))


def target_summary(config: PretrainedConfig) -> dict[str, int]:
    """A resolved target's sizes and parameter count, echoed before any work starts."""
    return {**sizes_of(config), "parameters": num_parameters(config)}
