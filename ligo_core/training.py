"""A plain training loop and a deterministic held-out loss, for causal and masked LMs.

nanoGPT-style: AdamW (weight decay on matrices only), linear warmup then cosine (or
constant / linear) decay, gradient clipping, one loop that reads top to bottom. The loss is
``ligo_core.objective``'s (the one the operator is fitted on): mean cross-entropy over target
tokens, next-token or masked.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import torch

from ligo_core.errors import DeviceError
from ligo_core.objective import loss_terms

SCHEDULES = ("cosine", "linear", "constant")


def lr_at(step: int, steps: int, lr: float, warmup: int, schedule: str = "cosine",
          min_ratio: float = 0.1) -> float:
    """Learning rate for ``step`` (0-based): linear warmup, then decay to ``min_ratio * lr``."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    if schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return lr * (min_ratio + (1.0 - min_ratio) * decay)


def _param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def default_device(device=None) -> torch.device:
    """CUDA when there is a GPU and the CPU otherwise (None, "auto"); else the device named, which
    must exist here: a missing GPU is a DeviceError that says so, not torch's assertion later."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N", field="device") from None
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "a CUDA build" if torch.version.cuda else "a CPU-only build"
            raise DeviceError(f"device {device!r}: torch ({torch.__version__}, {build}) sees no CUDA GPU on this "
                              "machine; use cpu or auto", field="device")
        if chosen.index is not None and chosen.index >= count:
            raise DeviceError(f"device {device!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}",
                              field="device")
    elif chosen.type != "cpu":
        raise DeviceError(f"device {device!r}: only cpu and cuda are supported", field="device")
    return chosen


def train(
    model,
    batches: Iterator[torch.Tensor],
    steps: int,
    *,
    lr: float,
    warmup: int = 0,
    weight_decay: float = 0.01,
    clip: float = 1.0,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.98),
    objective: str = "clm",
    tokenizer_info: dict | None = None,
    eval_every: int = 0,
    eval_fn: Callable[[torch.nn.Module], float] | None = None,
    seed: int = 0,
    device=None,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Train ``model`` in place for ``steps`` steps; returns the history.

    ``history = {"train_loss": [per step], "evals": [{"step", "loss", "train_time"}], "train_time"}``.
    ``train_time`` is wall-clock seconds spent training (evaluation excluded), cumulative at each
    eval. With ``eval_fn`` and ``eval_every``, held-out loss is logged at step 0 (before any
    update), every ``eval_every`` steps and at the end.
    """
    device = default_device(device)
    model.to(device).train()
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=betas,
                            fused=device.type == "cuda")
    mask_gen = torch.Generator().manual_seed(seed)  # MLM masks: same seed, same masks
    history: dict = {"train_loss": [], "evals": [], "train_time": 0.0}
    train_time = 0.0

    def evaluate(step: int) -> None:
        if eval_fn is None:
            return
        loss = float(eval_fn(model))
        model.train()
        history["evals"].append({"step": step, "loss": loss, "train_time": train_time})
        if progress:
            progress({"stage": "eval", "step": step, "total": steps, "loss": loss})

    if eval_every:
        evaluate(0)
    for step in range(steps):
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup, schedule, min_lr_ratio)
        batch = next(batches).to(device, non_blocking=True)
        total, count = loss_terms(model, batch, objective, tokenizer_info, mask_gen)
        loss = total / max(count, 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        loss_value = loss.item()  # synchronises, so the timing below is honest on a GPU
        train_time += time.perf_counter() - start
        history["train_loss"].append(loss_value)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"training loss is {loss_value} at step {step}")
        if progress:
            progress({"stage": "train", "step": step + 1, "total": steps, "loss": loss_value})
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            evaluate(step + 1)
    history["train_time"] = train_time
    return history

