"""Bounds on the sizes a config or a target may name, checked before anything is built from them.

An uploaded ``config.json``, an estimate's source and a job's target are plain numbers until
transformers builds a config object (Qwen2's makes a list with an entry per layer) or a worker
builds a model: each is checked against this table first, so an absurd value is a 422 naming
the field at once. The grown model's parameter count has its own cap
(``LIGO_MAX_TARGET_PARAMETERS``), counted from its config without building it.
"""

from __future__ import annotations

import functools
from typing import Any

# Config keys that name a size besides the target fields (ligo_core.targets.FIELD_ALIASES); each
# size's largest value is ligo_core.checkpoint.SIZE_BOUNDS, the checkpoint reader's own.
CONFIG_KEYS = {"vocab_size": "vocab_size", "max_position_embeddings": "positions", "n_positions": "positions",
               "n_ctx": "positions"}


@functools.cache
def _sizes() -> tuple[dict[str, str], dict[str, int]]:
    """(key -> size, size -> bound), read from ligo_core on first use: this module is imported
    where torch must not be (the worker's parent process)."""
    from ligo_core.checkpoint import SIZE_BOUNDS
    from ligo_core.targets import FIELD_ALIASES

    keys = {k: v for k, v in FIELD_ALIASES.items() if v in SIZE_BOUNDS}
    return {**keys, **CONFIG_KEYS}, SIZE_BOUNDS


def _number(value: Any) -> float | None:
    """The value as a number if it is one (or a string of digits, as in ``layers=12``)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        digits = value.strip().lstrip("+-")
        if digits.isascii() and digits.isdigit():
            return float("inf") if len(digits) > 18 else int(value.strip())
    return None


class OutOfBounds(Exception):
    """A size out of range: a 422 naming ``field`` (app.problems answers it; the validator
    process, which has no FastAPI, reports it the same way)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


def size_problem(key: str, value: Any) -> str | None:
    """Why ``key=value`` is out of bounds, or None (unknown keys and non-numbers are left to the engine)."""
    keys, bounds = _sizes()
    size, number = keys.get(key.strip().lower()), _number(value)
    if size is None or number is None:
        return None
    if number > bounds[size]:
        return f"{key} {value} is over the limit of {bounds[size]}"
    if number < 1:
        return f"{key} must be at least 1, got {value}"
    return None


def check_sizes(values: dict, field: str) -> None:
    """Refuse a config dict whose sizes are out of bounds, naming ``field.key``."""
    for key, value in values.items():
        if isinstance(key, str) and (problem := size_problem(key, value)):
            raise OutOfBounds(f"{field}.{key}", problem)


def check_spec(spec: Any, field: str) -> None:
    """Bound the sizes of a target (or source) spec: a preset name, ``layers=..,hidden=..`` or a dict."""
    if isinstance(spec, dict):
        check_sizes(spec, field)
    elif isinstance(spec, str) and "=" in spec:
        for part in spec.split(","):
            key, _, value = part.partition("=")
            if problem := size_problem(key, value):
                raise OutOfBounds(field, problem)


def check_parameters(config, cap: int, field: str = "target") -> None:
    """Refuse a model of more than ``cap`` parameters (counted from the config, nothing built)."""
    from app.ligo_bridge import num_parameters

    params = num_parameters(config)
    if params > cap:
        raise OutOfBounds(field, f"the model would have {params:,} parameters, over this service's limit "
                                   f"of {cap:,} (LIGO_MAX_TARGET_PARAMETERS)")
