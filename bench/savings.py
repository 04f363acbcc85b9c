"""Does growing save compute?  The LiGO paper's Table 1 at small scale.

For each model family (GPT-2, causal LM; BERT, masked LM):

1. train a byte-level BPE tokenizer on the train split of the shipped corpus;
2. pretrain a small model for a fixed budget (not counted in any saving);
3. for every seed and strategy, build the large model (``scratch`` = random init, or
   ``ligo_core.grow_model`` with ``stack``, ``interpolate``, ``net2net``, ``preserve``,
   ``ligo``, and on request ``ligo-stack``) and train it with the identical recipe (optimizer, schedule, batch, sequence
   length, steps, data order, seed), logging held-out loss at regular intervals;
4. savings = 1 - (FLOPs to reach the scratch run's final held-out loss, growth/fitting
   included) / (FLOPs of the scratch run), crossing points interpolated linearly between
   eval points; the same for wall time.

    python -m bench.savings [--models gpt2,bert] [--seeds 0,1] [--size default|tiny|gpu]

Writes ``savings.md``, ``savings.json`` (one record per run), ``savings_curves.json`` and
``savings_loss_curves.png`` under ``--out`` (default ``docs/results``); the set-up it shares with
the other benchmarks is in ``bench.common``, the records, tables and plot in ``bench.report``. The
reference run (the default ``--out``) also writes its records to ``ligo_core/data/calibration.json``
when it completes: the measured calibration that ``ligo estimate`` ships with (``--calibration``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

import ligo_core
from bench.common import (
    FLOPS_CONVENTION,
    LIGO_VARIANTS,
    MODELS,
    SIZES,
    STRATEGIES,
    Prepared,
    Size,
    loss_scorer,
    machine,
    model_class,
    n_params,
    prepare,
    pretrain_small,
    target_config,
    train_flops_per_token,
)
from bench.report import calibration_path, plot, rewrite_report, write_calibration, write_tables
from ligo_core import cost
from ligo_core.allocator import keep_freed_memory
from ligo_core.data import batches
from ligo_core.training import default_device, train

DEFAULT_STRATEGIES = STRATEGIES[:-1]


class CountingBatches:
    """Wraps a batch iterator and counts the batches drawn from it (for fitting FLOPs)."""

    def __init__(self, it):
        self.it, self.batches = it, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        self.batches += 1
        return batch


def build_large(strategy: str, small, tconfig, data: Prepared, size: Size, seed: int, device):
    """(large model, growth FLOPs, growth wall seconds, info)."""
    started = time.perf_counter()
    if strategy == "scratch":
        torch.manual_seed(seed)
        return model_class(data.model)(tconfig), 0.0, 0.0, {}
    fit_batches = CountingBatches(batches(data.train_tokens, size.fit_batch_size(), seed=10_000 + seed))
    ligo_init = LIGO_VARIANTS.get(strategy)
    large, info = ligo_core.grow_model(
        copy.deepcopy(small), tconfig, strategy="ligo" if ligo_init else strategy,
        fit_steps=size.fit_steps if ligo_init else 0, train_batches=fit_batches, seed=seed, device=device,
        tokenizer=data.tokenizer, **({"ligo_init": ligo_init} if ligo_init else {}),
        **{k: v for k, v in {"noise": size.noise, "lr": size.fit_lr, "spread": size.spread}.items() if v is not None},
    )
    for param in large.parameters():  # grow_model returns weights that may not require grad
        param.requires_grad_(True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    fit_flops = info.get("fit_flops")
    if fit_flops is None:
        # Every batch grow_model drew costs a forward and backward pass of the large model, plus the
        # operator's own work per step (or one materialisation for the fixed strategies).
        fit_flops = cost.fit_flops(small.config, tconfig, strategy="ligo" if ligo_init else strategy,
                                   steps=fit_batches.batches,
                                   batch=size.fit_batch_size(), seq_len=size.seq_len,
                                   convention=FLOPS_CONVENTION)["flops"]
    return large, float(fit_flops), seconds, info


# ----------------------------------------------------------------------------- one model family


def run_model(model: str, size: Size, seeds: list[int], strategies: list[str], device, log,
              on_run=None) -> dict:
    """Pretrain the small model, then grow and train every (seed, strategy); ``on_run(result)`` after each."""
    size = size.for_model(model)
    data = prepare(model, size)
    eval_fn = loss_scorer(data, device)
    seen_fn = loss_scorer(data, device, data.train_tokens[: size.eval_seqs])
    small, small_hist = pretrain_small(model, size, data, device, log)
    small_loss = eval_fn(small)
    log(f"[{model}] small held-out loss {small_loss:.3f}")
    tconfig = target_config(small.config, size.large)

    per_token = train_flops_per_token(tconfig, size.seq_len)
    step_flops = per_token * size.batch * size.seq_len
    runs: list[dict] = []
    result = {
        "model": model, "small_loss": small_loss, "small_params": n_params(small),
        "small_train_loss_end": statistics.fmean(small_hist["train_loss"][-20:]),
        "large_params": n_params(model_class(model)(tconfig)), "step_flops": step_flops, "runs": runs,
        "source": _setting(small.config), "target": _setting(tconfig), "recipe": asdict(size),
    }
    for seed in seeds:
        for strategy in strategies:
            large, fit_flops, grow_seconds, info = build_large(strategy, small, tconfig, data, size, seed, device)
            init_loss = eval_fn(large)
            hist = train(large, batches(data.train_tokens, size.batch, seed=seed), size.steps, lr=size.lr,
                         warmup=size.warmup(size.steps), weight_decay=size.weight_decay, objective=data.objective,
                         tokenizer_info=data.info, eval_every=size.eval_every, eval_fn=eval_fn, seed=seed,
                         device=device)
            evals = hist["evals"]
            runs.append({
                "model": model, "strategy": strategy, "seed": seed,
                "steps": [e["step"] for e in evals],
                "losses": [e["loss"] for e in evals],
                # Loss on training sequences at the end: its gap to held-out shows memorisation of
                # the repeated corpus (scored once, not at every eval: that was 5% of the run).
                "final_seen_loss": seen_fn(large),
                "flops": [fit_flops + e["step"] * step_flops for e in evals],
                "wall": [grow_seconds + e["train_time"] for e in evals],
                "fit_flops": fit_flops, "grow_seconds": grow_seconds, "init_loss": init_loss,
                "ligo_init": info.get("ligo_init"),
                "fit_history": info.get("fit_history", []),
                "large_params": n_params(large),
            })
            log(f"[{model}] seed {seed} {strategy:<11} init {init_loss:.3f} -> final {evals[-1]['loss']:.3f}"
                f"  grow {grow_seconds:.1f}s train {hist['train_time']:.0f}s")
            del large
            if on_run:
                on_run(result)
    return result


def _setting(config) -> dict:
    sizes = ligo_core.sizes_of(config)
    return {k: sizes[k] for k in ("layers", "hidden", "heads", "ffn")}


def with_overrides(size: Size, overrides: dict) -> Size:
    """``size`` with the command line's values, which win over a family's own values too."""
    return replace(size, **overrides, bert={k: v for k, v in size.bert.items() if k not in overrides})


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="gpt2,bert")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                   help=f"comma-separated, from {', '.join(STRATEGIES)} (default: all but ligo-stack)")
    p.add_argument("--size", choices=sorted(SIZES), default="default")
    p.add_argument("--steps", type=int, help="training steps of every large run (overrides the size)")
    p.add_argument("--small-steps", type=int, help="pretraining steps of the small model")
    p.add_argument("--lr", type=float, help="peak learning rate of every large run (overrides the size and family)")
    p.add_argument("--fit-steps", type=int, help="LiGO operator fitting steps")
    p.add_argument("--fit-batch", type=int, help="sequences per LiGO fitting step (default: the training batch)")
    p.add_argument("--fit-lr", type=float, help="LiGO fitting's peak learning rate (default 1e-3, the recorded runs')")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--noise", type=float, help="growth's symmetry breaking in [0, 1] (default: the engine's)")
    p.add_argument("--spread", type=float, help="how far growth moves copied units apart (default 2, the recorded runs')")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest for the tiny size on a busy machine)")
    p.add_argument("--out", default="docs/results")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--report", metavar="CURVES_JSON",
                   help="train nothing: rewrite savings.md and savings.json beside this savings_curves.json")
    p.add_argument("--calibration", metavar="PATH",
                   help="when the run completes, also write its records here, as the cost estimate's measured "
                        "calibration (default: ligo_core/data/calibration.json for --out docs/results, "
                        "nowhere for other folders; '' for nowhere)")
    args = p.parse_args(argv)
    if args.report:
        if not Path(args.report).is_file():
            p.error(f"--report: no curves file at {args.report} (a finished run writes savings_curves.json)")
        return rewrite_report(Path(args.report), calibration_path(Path(args.report).parent, args.calibration))

    size = SIZES[args.size]
    overrides = {k: v for k, v in {"steps": args.steps, "small_steps": args.small_steps, "lr": args.lr,
                                   "fit_steps": args.fit_steps, "fit_batch": args.fit_batch, "fit_lr": args.fit_lr,
                                   "eval_every": args.eval_every, "noise": args.noise,
                                   "spread": args.spread}.items() if v is not None}
    size = with_overrides(size, overrides)
    models = [m for m in args.models.split(",") if m]
    strategies = [s for s in args.strategies.split(",") if s]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    for s in strategies:
        if s not in STRATEGIES:
            p.error(f"unknown strategy {s!r}; choose from {', '.join(STRATEGIES)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # 19% of a GPT-2 CPU step was page faults (ligo_core/allocator.py)
    device = default_device(args.device)
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"{time.perf_counter() - started:7.0f}s  {msg}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calibration_to = calibration_path(out, args.calibration)

    def write(results: list[dict], final: bool) -> list[dict]:
        # Written after every run, so that a long run that stops early still leaves its results.
        meta = {
            "command": "python -m bench.savings " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine(), "device": str(device), "size": args.size,
            "size_fields": json.dumps(asdict(size)), "wall_minutes": (time.perf_counter() - started) / 60,
            "complete": final,
        }
        (out / "savings_curves.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
        recs = write_tables(out, results, meta)
        if final and not args.no_plot:
            plot(results, out / "savings_loss_curves.png")
        if final and calibration_to is not None:
            write_calibration(calibration_to, recs)
        return recs

    results: list[dict] = []
    for m in models:
        # run_model's result joins `results` when it returns; until then on_run writes it alongside.
        results.append(run_model(m, size, seeds, strategies, device, log,
                                 on_run=lambda res: write(results + [res], final=False)))
    recs = write(results, final=True)
    log(f"wrote {out}/savings.md, savings.json, savings_curves.json" + ("" if args.no_plot else ", savings_loss_curves.png")
        + (f"; the estimate's calibration {calibration_to}" if calibration_to else ""))
    return recs


if __name__ == "__main__":
    main()
