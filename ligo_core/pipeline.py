"""The whole job: checkpoint in, grown checkpoint and growth report out."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ligo_core.catalog import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_FIT_STEPS,
    DEFAULT_LIGO_INIT,
    DEFAULT_NOISE,
    DEFAULT_SEQ_LEN,
    eval_tokens_problem,
)
from ligo_core.checkpoint import check_checkpoint, load_checkpoint, load_tokenizer, opened_source
from ligo_core.data import batches, build_token_data
from ligo_core.errors import DataError, TargetError
from ligo_core.growth import (
    bare_model_refusal,
    data_parallel_rank,
    grow_model,
    start_operator,
    wait_for_ranks,
)
from ligo_core.matrices import target_summary
from ligo_core.memory_plan import READ_CACHE_BYTES
from ligo_core.output import check_output_dir, staged_output, write_checkpoint, write_side_files
from ligo_core.stream import grown_shapes, output_dtype, stream_weights, write_config
from ligo_core.targets import max_positions, resolve_target, sizes_of
from ligo_core.training import default_device
from ligo_core.weights import ReadCache, open_weights

HELDOUT_SEQUENCES = 64


def _versions() -> dict[str, str]:
    import huggingface_hub
    import safetensors
    import transformers

    from ligo_core.version import __version__

    return {
        "ligo": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "safetensors": safetensors.__version__, "huggingface_hub": huggingface_hub.__version__,
        "python": platform.python_version(),
    }


@torch.no_grad()
def function_gap(small, large, tokens: torch.Tensor, device) -> float | None:
    """Largest logit difference between the small and grown model on a few held-out sequences."""
    if small.get_output_embeddings() is None or tokens is None:
        return None
    batch = tokens[:4].to(device)
    a = small.to(device)(input_ids=batch).logits.float()
    b = large.to(device)(input_ids=batch).logits.float()
    return float((a - b).abs().max())


def check_memory(source_config, target_config, *, strategy: str, fit_steps: int, batch_size: int, seq_len: int,
                 scored: bool, dtype: str | None, memory_gb: float | None, device: str | None) -> dict:
    """The job's memory plan against the budget (ligo_core/memory_plan.py); MemoryPlanError if above."""
    from ligo_core import memory_plan
    from ligo_core.errors import MemoryPlanError

    processes = data_parallel_rank()[1]
    estimate = memory_plan.plan(source_config.to_dict(), target_config.to_dict(), strategy=strategy,
                                fit_steps=fit_steps, batch_size=batch_size, seq_len=seq_len, scored=scored,
                                dtype=dtype, processes=processes)
    budget, where = memory_plan.budget_bytes(memory_gb, device)
    if processes > 1 and not str(device).startswith("cuda"):  # CPU ranks share one machine's memory
        budget, where = budget // processes, f"{where}, shared by {processes} processes"
    reason = memory_plan.refusal(estimate, budget, where)
    if reason:
        raise MemoryPlanError(reason, estimate, budget)
    return {"gib": estimate["gib"], "budget_gib": round(budget / memory_plan.GiB, 2), "budget_source": where,
            "biggest": estimate["biggest"]}


def grow(
    src: str | Path,
    target,
    out_dir: str | Path,
    *,
    strategy: str = "ligo",
    fit_steps: int = DEFAULT_FIT_STEPS,
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
    eval_tokens: int | None = None,
    dtype: str | None = None,
    memory_gb: float | None = None,
) -> dict:
    """Grow the checkpoint at ``src`` to ``target`` and write it to ``out_dir``; returns the report.

    ``follow_links``: the checkpoint's files may link outside its directory (a user's own
    Hugging Face cache snapshot); never for uploaded checkpoints (``checkpoint.confined``).

    ``eval_tokens``: held-out tokens to score the small, grown and random models on (default
    HELDOUT_SEQUENCES x seq_len; 0 skips scoring). Scoring needs both models in memory; without it,
    nothing is built: the grown tensors are written one at a time (ligo_core/stream.py), and a fit
    keeps only the small model and the operator. ``dtype``: "auto" (the source's) or float32,
    bfloat16, float16. ``memory_gb``: the memory budget the job's plan must fit (default
    LIGO_WORKER_MEMORY_GB, else the device's memory; ligo_core/memory_plan.py)."""
    started = time.perf_counter()
    check_output_dir(out_dir)
    dev = default_device(device)
    emit = progress or (lambda event: None)
    emit({"stage": "loading", "step": 0, "total": 1, "loss": None})
    if eval_tokens is not None and eval_tokens < 0:
        raise DataError(f"eval_tokens must be 0 (no held-out scoring) or more, got {eval_tokens}")
    with opened_source(src) as directory:
        checked = check_checkpoint(directory, follow_links)
        checked.weights.close()  # headers only here; tensors are read below, lazily or all at once
        config, layout = checked.config, checked.layout
        target_config = resolve_target(target, config)
        emit({"stage": "loading", "step": 0, "total": 1, "loss": None, "target": target_summary(target_config)})
        out_dtype = output_dtype(dtype, checked.dtype)
        batch_size = batch_size or DEFAULT_BATCH_SIZE
        seq_len = min(seq_len or DEFAULT_SEQ_LEN, max_positions(config))
        heldout_tokens = HELDOUT_SEQUENCES * seq_len if eval_tokens is None else eval_tokens
        if problem := eval_tokens_problem(heldout_tokens, seq_len):
            raise DataError(problem, field="eval_tokens")
        fitting = strategy == "ligo" and fit_steps > 0
        # A bare model (no LM head) has no language-model loss: nothing to fit, no held-out loss to show.
        scored = layout.has_head
        if fitting and not scored:
            raise TargetError(bare_model_refusal(checked.model_class))
        tokenizer = load_tokenizer(directory, follow_links)
        if tokenizer is None and fitting:
            raise DataError("the checkpoint has no tokenizer files; fitting 'ligo' needs its tokenizer")
        scoring = scored and tokenizer is not None and heldout_tokens > 0
        memory = check_memory(config, target_config, strategy=strategy, fit_steps=fit_steps if fitting else 0,
                              batch_size=batch_size, seq_len=seq_len, scored=scoring, dtype=dtype,
                              memory_gb=memory_gb, device=str(dev))
        run = dict(strategy=strategy, seed=seed, noise=noise, spread=spread, ligo_init=ligo_init)
        if not fitting and not scoring:
            report, files = _grow_streamed(directory, follow_links, checked, target_config, out_dir, out_dtype,
                                           max_shard_size, emit, should_cancel, started, run)
            report["memory_plan"] = memory
            return _finish(report, files)
        loaded = load_checkpoint(directory, follow_links)
        token_data = None
        if scored and tokenizer is not None:
            # Fewer eval tokens than the default leave the training split as it is: the held-out side is
            # cut as usual, then trimmed.
            token_data = build_token_data(
                data, loaded.tokenizer, seq_len,
                max_train_tokens=max(fit_steps, 1) * accumulate * batch_size * seq_len * 2,
                max_heldout_tokens=max(heldout_tokens, HELDOUT_SEQUENCES * seq_len),
            )
        heldout = token_data.heldout[: heldout_tokens // seq_len] if token_data is not None and scoring else None
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
            noise=noise, spread=spread, stream=True, dtype=out_dtype,
        )
        grown = info.pop("grown", None)
        large_config = large.config if large is not None else grown.config
        gap = function_gap(loaded.model, large, heldout, dev) if large is not None else None
        target_parameters = (sum(p.numel() for p in large.parameters()) if large is not None
                             else _count(grown_shapes(grown.operator, layout.names, _shapes(grown.small_state))))
        report = _report(info, loaded.config, large_config, layout, loaded.format,
                         sum(p.numel() for p in loaded.model.parameters()), target_parameters, dev, seed)
        report["fit"].update({
            "batch_size": batch_size, "seq_len": seq_len, "accumulate": accumulate,
            "tokens": info["fit_steps"] * accumulate * batch_size * seq_len,
            "data": token_data.source if token_data is not None else None,
        })
        report["heldout_loss"].update({
            "small": small_loss, "sequences": int(heldout.shape[0]) if heldout is not None else 0,
            **({} if scored else {"note": "a bare model (no LM head) has no language-model loss"}),
        })
        report["eval_tokens"] = int(heldout.numel()) if heldout is not None else 0
        report["function_gap_max_logit"] = gap
        report["memory_plan"] = memory
        costs = _fit_flops(loaded.config, large_config, report)
        report["fit"]["flops"] = costs["flops"]
        report["fit"]["operator_flops"] = costs["operator_flops"]
        _check_cancel(should_cancel)
        emit({"stage": "saving", "step": 0, "total": 1, "loss": None})
        report["seconds"] = round(time.perf_counter() - started, 3)
        rank, report["processes"] = data_parallel_rank()
        files: list[str] = []
        if rank == 0 and large is not None:  # several processes (ligo_core/parallel.py): rank 0 writes
            files = write_checkpoint(large, out_dir, dtype=out_dtype, source_dir=directory, report=report,
                                     max_shard_size=max_shard_size)
        elif rank == 0:
            del loaded
            with staged_output(out_dir) as tmp:
                shapes = grown_shapes(grown.operator, layout.names, _shapes(grown.small_state))
                stream_weights(tmp, shapes, lambda allocate: grown.tensors(out_dtype, allocate), dtype=out_dtype,
                               max_shard_size=max_shard_size)
                write_config(tmp, grown.config, checked.model_class, out_dtype)
                write_side_files(tmp, directory, report)
            files = sorted(p.name for p in Path(out_dir).iterdir())
        wait_for_ranks()  # the other ranks return once rank 0 has written
        return _finish(report, files)


def _grow_streamed(directory, follow_links, checked, target_config, out_dir, out_dtype, max_shard_size, emit,
                   should_cancel, started, run) -> tuple[dict, list[str]]:
    """A fixed strategy with nothing to score: no model is built; the small tensors are read from
    disk as the operator needs them, and each grown tensor is written before the next is made."""
    from ligo_core.rowblocks import fixed_tensors
    from ligo_core.separation import Separation

    config, layout = checked.config, checked.layout
    operator, large_config = start_operator(config, layout, target_config, strategy=run["strategy"],
                                            seed=run["seed"], noise=run["noise"], spread=run["spread"],
                                            ligo_init=run["ligo_init"], planned=True)
    # grow_model's separation draws, in its order
    separation = Separation(operator, operator.spread, torch.Generator().manual_seed(run["seed"] + 2))
    info = {
        "strategy": run["strategy"], "operator_parameters": operator.num_parameters(), "fit_steps": 0,
        "fit_history": [], "fit_seconds": 0.0, "dropped_tensors": layout.dropped, "ligo_init": None,
        "noise": operator.noise, "spread": operator.spread, "norm_eps_scale": operator.norm_scale**2,
        "heldout_loss": {"random": None, "before_fit": None, "after_fit": None},
    }
    with open_weights(directory, follow_links) as weights:
        shapes = grown_shapes(operator, layout.names, weights.shapes)
        report = _report(info, config, large_config, layout, weights.format, checked.num_parameters,
                         _count(shapes), torch.device("cpu"), run["seed"])
        report["fit"].update({"batch_size": None, "seq_len": None, "accumulate": None, "tokens": 0, "data": None})
        report["heldout_loss"].update({"small": None, "sequences": 0, **(
            {} if layout.has_head else {"note": "a bare model (no LM head) has no language-model loss"})})
        report["eval_tokens"] = 0
        report["function_gap_max_logit"] = None
        report["processes"] = 1  # nothing to fit: one process whatever --nproc says
        costs = _fit_flops(config, large_config, {**report, "fit": {**report["fit"], "batch_size": 1, "seq_len": 1}})
        report["fit"]["flops"], report["fit"]["operator_flops"] = costs["flops"], costs["operator_flops"]

        # Small tensors in their stored dtype (the blocks are widened in fp32), each read once while
        # they fit the cache: stacking reads a small layer once per copy.
        read = ReadCache(weights.get, READ_CACHE_BYTES)

        def written(done: int, total: int) -> None:
            _check_cancel(should_cancel)
            emit({"stage": "saving", "step": done, "total": total, "loss": None})

        with staged_output(out_dir) as tmp:
            stream_weights(tmp, shapes, lambda allocate: fixed_tensors(operator, read, layout.names, separation,
                                                                       out_dtype, allocate),
                           dtype=out_dtype, max_shard_size=max_shard_size, progress=written)
            write_config(tmp, large_config, checked.model_class, out_dtype)
            report["seconds"] = round(time.perf_counter() - started, 3)
            write_side_files(tmp, directory, report)
    return report, sorted(p.name for p in Path(out_dir).iterdir())


def _report(info: dict, source_config, large_config, layout, fmt: str, source_parameters: int,
            target_parameters: int, dev, seed: int) -> dict:
    """The report's fields common to every path; callers add the data-dependent ones."""
    return {
        "strategy": info["strategy"],
        "ligo_init": info["ligo_init"],
        "noise": info["noise"],
        "spread": info["spread"],
        "family": layout.family.name,
        "source": {
            "config": source_config.to_dict(), "sizes": sizes_of(source_config),
            "parameters": source_parameters, "format": fmt,
        },
        "target": {
            "config": large_config.to_dict(), "sizes": sizes_of(large_config), "parameters": target_parameters,
        },
        "operator_parameters": info["operator_parameters"],
        "fit": {
            **_fit_outcome(info),
            "steps": info["fit_steps"], "steps_requested": info.get("fit_steps_requested"),
            "lr": info.get("fit_lr"), "warmup": info.get("fit_warmup"),
            "seconds": round(info["fit_seconds"], 3), "loss_history": info["fit_history"],
        },
        "heldout_loss": {
            "grown_before_fit": info["heldout_loss"]["before_fit"],
            "grown_after_fit": info["heldout_loss"]["after_fit"],
            "fit_start": info["heldout_loss"].get("fit_start"),
            "random_large": info["heldout_loss"]["random"],
        },
        "norm_eps_scale": info["norm_eps_scale"],
        "dropped_tensors": info["dropped_tensors"],
        "seed": seed,
        "device": str(dev),
        "versions": _versions(),
    }


def _finish(report: dict, files: list[str]) -> dict:
    report["files"] = files
    return report


def _check_cancel(should_cancel: Callable[[], bool] | None) -> None:
    if should_cancel is not None and should_cancel():
        from ligo_core.errors import GrowthCancelled

        raise GrowthCancelled()


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _count(shapes: dict[str, tuple[int, ...]]) -> int:
    total = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


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
