"""The whole job: checkpoint in, grown checkpoint and growth report out."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ligo_core.checkpoint import load_checkpoint, opened_source
from ligo_core.data import batches, build_token_data
from ligo_core.defaults import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN
from ligo_core.errors import DataError, TargetError
from ligo_core.growth import bare_model_refusal, data_parallel_rank, grow_model, pick_device, wait_for_ranks
from ligo_core.output import check_output_dir, write_checkpoint
from ligo_core.strategies import DEFAULT_LIGO_INIT, DEFAULT_NOISE
from ligo_core.targets import resolve_target, sizes_of, target_summary

HELDOUT_SEQUENCES = 64


def _versions() -> dict[str, str]:
    import huggingface_hub
    import safetensors
    import transformers

    from ligo_core import __version__

    return {
        "ligo": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "safetensors": safetensors.__version__, "huggingface_hub": huggingface_hub.__version__,
        "python": platform.python_version(),
    }


def _max_positions(config) -> int:
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048)


@torch.no_grad()
def function_gap(small, large, tokens: torch.Tensor, device) -> float | None:
    """Largest logit difference between the small and grown model on a few held-out sequences."""
    if small.get_output_embeddings() is None or tokens is None:
        return None
    batch = tokens[:4].to(device)
    a = small.to(device)(input_ids=batch).logits.float()
    b = large.to(device)(input_ids=batch).logits.float()
    return float((a - b).abs().max())


def grow(
    src: str | Path,
    target,
    out_dir: str | Path,
    *,
    strategy: str = "ligo",
    fit_steps: int = 100,
    data: str | Path | None = None,
    seed: int = 0,
    device: str | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    progress: Callable[[dict], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    max_shard_size: str | int = "2GB",
    ligo_init: str = DEFAULT_LIGO_INIT,
    accumulate: int = 1,
    noise: float = DEFAULT_NOISE,
    spread: float | None = None,
    follow_links: bool = False,
) -> dict:
    """Grow the checkpoint at ``src`` to ``target`` and write it to ``out_dir``; returns the report.

    ``follow_links``: the checkpoint's files may link outside its directory (a user's own
    Hugging Face cache snapshot); never for uploaded checkpoints (``checkpoint.confined``)."""
    started = time.perf_counter()
    check_output_dir(out_dir)
    dev = pick_device(device)
    emit = progress or (lambda event: None)
    emit({"stage": "loading", "step": 0, "total": 1, "loss": None})
    with opened_source(src) as directory:
        loaded = load_checkpoint(directory, follow_links)
        target_config = resolve_target(target, loaded.config)
        emit({"stage": "loading", "step": 0, "total": 1, "loss": None, "target": target_summary(target_config)})
        batch_size = batch_size or DEFAULT_BATCH_SIZE
        seq_len = min(seq_len or DEFAULT_SEQ_LEN, _max_positions(loaded.config))
        fitting = strategy == "ligo" and fit_steps > 0
        # A bare model (no LM head) has no language-model loss: nothing to fit, no held-out loss to show.
        scored = loaded.layout.has_head
        if fitting and not scored:
            raise TargetError(bare_model_refusal(loaded.model))
        token_data = None
        if loaded.tokenizer is None:
            if fitting:
                raise DataError("the checkpoint has no tokenizer files; fitting 'ligo' needs its tokenizer")
        elif scored:
            token_data = build_token_data(
                data, loaded.tokenizer, seq_len,
                max_train_tokens=max(fit_steps, 1) * accumulate * batch_size * seq_len * 2,
                max_heldout_tokens=HELDOUT_SEQUENCES * seq_len,
            )
        heldout = token_data.heldout if token_data is not None else None
        small_loss = None
        if heldout is not None:
            from ligo_core.objective import heldout_loss, tokenizer_info

            small_loss = heldout_loss(
                loaded.model.to(dev), heldout, loaded.layout.family.objective,
                tokenizer_info(loaded.tokenizer, loaded.config), device=dev,
                embedding_name=loaded.layout.embedding_name,
            )
        large, info = grow_model(
            loaded.model, target_config, strategy=strategy, fit_steps=fit_steps if fitting else 0,
            train_batches=batches(token_data.train, batch_size, seed) if token_data is not None else None,
            seed=seed, lr=lr, device=dev, progress=progress, should_cancel=should_cancel,
            tokenizer=loaded.tokenizer, heldout=heldout, ligo_init=ligo_init, accumulate=accumulate,
            noise=noise, spread=spread,
        )
        gap = function_gap(loaded.model, large, heldout, dev)
        report = {
            "strategy": strategy,
            "ligo_init": info["ligo_init"],
            "noise": info["noise"],
            "spread": info["spread"],
            "family": loaded.layout.family.name,
            "source": {
                "config": loaded.config.to_dict(), "sizes": sizes_of(loaded.config),
                "parameters": sum(p.numel() for p in loaded.model.parameters()), "format": loaded.format,
            },
            "target": {
                "config": large.config.to_dict(), "sizes": sizes_of(large.config),
                "parameters": sum(p.numel() for p in large.parameters()),
            },
            "operator_parameters": info["operator_parameters"],
            "fit": {
                **_fit_outcome(info),
                "steps": info["fit_steps"], "steps_requested": info.get("fit_steps_requested"),
                "lr": info.get("fit_lr"), "warmup": info.get("fit_warmup"), "batch_size": batch_size, "seq_len": seq_len,
                "accumulate": accumulate, "seconds": round(info["fit_seconds"], 3),
                "tokens": info["fit_steps"] * accumulate * batch_size * seq_len,
                "loss_history": info["fit_history"],
                "data": token_data.source if token_data is not None else None,
            },
            "heldout_loss": {
                "small": small_loss,
                "grown_before_fit": info["heldout_loss"]["before_fit"],
                "grown_after_fit": info["heldout_loss"]["after_fit"],
                "fit_start": info["heldout_loss"].get("fit_start"),
                "random_large": info["heldout_loss"]["random"],
                "sequences": int(heldout.shape[0]) if heldout is not None else 0,
                **({} if scored else {"note": "a bare model (no LM head) has no language-model loss"}),
            },
            "function_gap_max_logit": gap,
            "norm_eps_scale": info["norm_eps_scale"],
            "dropped_tensors": info["dropped_tensors"],
            "seed": seed,
            "device": str(dev),
            "versions": _versions(),
        }
        costs = _fit_flops(loaded.config, large.config, report)
        report["fit"]["flops"] = costs["flops"]
        report["fit"]["operator_flops"] = costs["operator_flops"]
        if should_cancel is not None and should_cancel():
            from ligo_core.errors import GrowthCancelled

            raise GrowthCancelled()
        emit({"stage": "saving", "step": 0, "total": 1, "loss": None})
        report["seconds"] = round(time.perf_counter() - started, 3)
        rank, report["processes"] = data_parallel_rank()
        if rank == 0:  # several processes (ligo_core/parallel.py): rank 0 writes, the others wait for it
            report["files"] = write_checkpoint(
                large, out_dir, dtype=loaded.dtype, source_dir=directory, report=report, max_shard_size=max_shard_size
            )
        wait_for_ranks()
    return report


def _fit_outcome(info: dict) -> dict:
    """The guard's verdict (ligo_core/fit_guard.py): ``outcome`` is None when nothing was fitted, and
    "unchecked" when a fit ran without held-out data to check it on."""
    guard = info.get("fit_guard")
    if guard is None:
        return {"outcome": "unchecked" if info["fit_steps"] else None}
    return guard


def _fit_flops(source_config, target_config, report: dict) -> dict:
    """Fitting FLOPs from the cost model: the large model's training steps plus the operator's work,
    counted as this engine computes them (a masked LM's head on the masked tokens only)."""
    from ligo_core.cost import fit_flops

    fit = report["fit"]
    return fit_flops(source_config, target_config, strategy=report["strategy"] if fit["steps"] else "preserve",
                     steps=fit["steps"], batch=fit["batch_size"], seq_len=fit["seq_len"], convention="engine")
