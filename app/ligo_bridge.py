"""The service's only door into ligo_core for configs: targets, estimates and checkpoint configs.

Nothing here touches tensors (transformers' config classes only). ligo_core is imported on
first use, so modules that import this one stay light.
"""

from __future__ import annotations

from typing import Any


def config_from_dict(data: dict[str, Any]):
    """A transformers config of the right class from a config.json dict."""
    from transformers import AutoConfig

    data = dict(data)
    model_type = data.pop("model_type", None)
    if not model_type:
        import ligo_core

        raise ligo_core.TargetError("the config has no model_type", field="model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError) as exc:
        import ligo_core

        raise ligo_core.TargetError(f"model_type {model_type!r}: {exc}", field="model_type") from None


def resolve_target(spec: Any, source_config: dict[str, Any] | None):
    """The full large config of ``spec`` grown from ``source_config``; TargetError names the field."""
    import ligo_core

    source = config_from_dict(source_config) if source_config is not None else None
    return ligo_core.resolve_target(spec, source)


def resolve_source(spec: Any):
    """A source model config from a preset name, fields or a config dict."""
    import ligo_core

    if isinstance(spec, dict) and spec.get("model_type"):
        return config_from_dict(spec)
    return ligo_core.resolve_target(spec, None)


def max_positions(config) -> int:
    """The longest sequence the model takes; the engine caps the fitting length at it (as here)."""
    from ligo_core.targets import max_positions as longest

    return longest(config)


def estimate(source_config, target_config, **kwargs) -> dict:
    """``ligo_core.cost.estimate``; an option given as None takes the engine's default."""
    from ligo_core.cost import estimate as _estimate

    return _estimate(source_config, target_config, **{k: v for k, v in kwargs.items() if v is not None})


def num_parameters(config) -> int:
    """Weight parameters of a model, counted from its config (nothing is built)."""
    from ligo_core.matrices import num_parameters as count

    return count(config)


def memory_refusal(source_config: dict, target_config, *, strategy: str, fit_steps: int, batch_size: int,
                   seq_len: int, scored: bool, dtype: str | None, budget_gb: float, processes: int = 1
                   ) -> dict | None:
    """The job's memory plan against ``budget_gb`` (ligo_core/memory_plan.py, torch-free), for one of
    its ``processes`` (LIGO_WORKER_GPUS): None when it fits, else the refusal's message and numbers."""
    from ligo_core import memory_plan

    estimate = memory_plan.plan(source_config, target_config.to_dict(), strategy=strategy, fit_steps=fit_steps,
                                batch_size=batch_size, seq_len=seq_len, scored=scored, dtype=dtype,
                                processes=processes)
    budget = int(budget_gb * memory_plan.GiB)
    message = memory_plan.refusal(estimate, budget, "LIGO_WORKER_MEMORY_GB")
    if message is None:
        return None
    return {"detail": message, "needed_gib": estimate["gib"], "budget_gib": round(budget_gb, 2),
            "biggest_term": estimate["biggest"],
            "terms_gib": {k: round(v / memory_plan.GiB, 2) for k, v in estimate["terms"].items()}}
