"""ligo_core: grow pretrained transformers with linear growth operators (LiGO and baselines).

Public API (the CLI, the worker and the benchmarks use only these names):

- ``inspect_checkpoint(src) -> dict``: family, config and parameter count of a checkpoint.
- ``grow(src, target, out_dir, ...) -> dict``: the whole job, from a checkpoint directory or
  archive to an output directory with ``growth_report.json``; returns the report.
- ``grow_parallel(src, target, out_dir, nproc=N, ...) -> dict``: ``grow`` with LiGO fitted by N
  data-parallel processes (torch.distributed; one per GPU, or gloo on the CPU).
- ``grow_model(small_model, target_config, ...) -> (large_model, info)``: in memory.
- ``resolve_target(spec, source_config=None)``: preset / config.json / fields -> HF config.
"""

from ligo_core.catalog import STRATEGY_NAMES as STRATEGIES
from ligo_core.errors import (
    CheckpointError,
    DataError,
    DeviceError,
    EstimateError,
    GrowthCancelled,
    LigoError,
    MemoryPlanError,
    TargetError,
)
from ligo_core.version import __version__

__all__ = [
    "__version__", "CheckpointError", "DataError", "DeviceError", "EstimateError", "GrowthCancelled", "LigoError",
    "MemoryPlanError", "TargetError",
    "PRESETS", "family_of", "resolve_target", "sizes_of",
    "STRATEGIES", "grow", "grow_model", "grow_parallel", "inspect_checkpoint",
]

# Everything that needs transformers or torch loads on first use: `import ligo_core` (and its
# torch-free catalog, which the API's schemas read) stays cheap, and the worker's parent process,
# which forks job processes, never loads torch.
_LAZY = {
    "PRESETS": "ligo_core.targets", "family_of": "ligo_core.targets", "resolve_target": "ligo_core.targets",
    "sizes_of": "ligo_core.targets", "grow": "ligo_core.pipeline", "grow_parallel": "ligo_core.parallel",
    "grow_model": "ligo_core.growth",
    "inspect_checkpoint": "ligo_core.checkpoint",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
