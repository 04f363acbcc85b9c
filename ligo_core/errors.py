"""Errors that name what is wrong with an input; every public entry point raises only these."""


class LigoError(ValueError):
    """Base class: the message is one line a user can act on; ``field``, when known, names the
    input it is about (a target's size field, an estimate's parameter), so that a caller can
    point at that input without reading the message."""

    def __init__(self, *args, field: str | None = None):
        super().__init__(*args)
        self.field = field


class CheckpointError(LigoError):
    """The source checkpoint is missing, unsafe, corrupt, or of an unsupported family."""


class TargetError(LigoError):
    """The target architecture is inconsistent or would shrink the source."""


class DataError(LigoError):
    """The fitting data cannot be read or is too small."""


class EstimateError(LigoError):
    """An estimate's inputs are out of range (unknown GPU, negative tokens, ...); ``field`` is the
    parameter's name (``fit_steps``, ``gpu``, ``price_per_gpu_hour``, ...)."""


class DeviceError(LigoError):
    """The device asked for is not one this machine has (no CUDA build or GPU, no such GPU index)."""


class GrowthCancelled(Exception):
    """Raised inside grow() when the caller's should_cancel() answers True."""


class MemoryPlanError(LigoError):
    """The job's memory plan (ligo_core/memory_plan.py) is above the worker's budget."""

    def __init__(self, message: str, estimate: dict | None = None, budget: int | None = None):
        super().__init__(message, field="memory")
        self.estimate, self.budget = estimate, budget
