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

__version__ = "0.1.0"

from ligo_core.errors import CheckpointError, DataError, GrowthCancelled, LigoError, TargetError
from ligo_core.targets import PRESETS, family_of, resolve_target, sizes_of

__all__ = [
    "CheckpointError", "DataError", "GrowthCancelled", "LigoError", "TargetError",
    "PRESETS", "family_of", "resolve_target", "sizes_of",
    "STRATEGIES", "grow", "grow_model", "grow_parallel", "inspect_checkpoint",
]

STRATEGIES = ("ligo", "stack", "interpolate", "net2net", "preserve")


def __getattr__(name):
    # Heavier modules load on first use so that `import ligo_core` stays cheap for the API process.
    if name == "grow":
        from ligo_core.pipeline import grow
        return grow
    if name == "grow_parallel":
        from ligo_core.parallel import grow_parallel
        return grow_parallel
    if name == "grow_model":
        from ligo_core.growth import grow_model
        return grow_model
    if name == "inspect_checkpoint":
        from ligo_core.checkpoint import inspect_checkpoint
        return inspect_checkpoint
    raise AttributeError(name)
