"""How much does fitting the LiGO operator buy, per fitting step and learning rate?

Pretrains the savings benchmark's small model (same size, data and seed), then fits the
operator from each start (``--inits``) for every number of steps and peak learning rate, and
prints the held-out loss of the grown model against the unfitted start and the small model.
The fit's cost is in large-model training steps (a fitting step is a forward and backward pass
of the large model plus the operator's own work), so a gain can be set against what the same
FLOPs buy in continued training (the savings curves).

    python -m bench.fit_sweep [--model gpt2] [--inits preserve,stack] [--steps 6,12,24,48]
                              [--lrs 3e-4,1e-3,3e-3] [--fit-batches 32] [--out docs/results/fit_sweep.md]

``--fit-batches`` sets the sequences per fitting step (default: the benchmark's training batch); a
smaller batch makes each step cheaper, which matters where the fit is a visible share of a run.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import ligo_core
from bench import common
from ligo_core import cost
from ligo_core.allocator import keep_freed_memory
from ligo_core.catalog import LIGO_INITS
from ligo_core.data import batches
from ligo_core.training import default_device


def sweep(model: str, size: common.Size, inits: list[str], steps: list[int], lrs: list[float], seed: int,
          device, log=print, fit_batches: list[int] | None = None) -> dict:
    data = common.prepare(model, size)
    score = common.loss_scorer(data, device)
    small, _ = common.pretrain_small(model, size, data, device, log)
    tconfig = common.target_config(small.config, size.large)
    step_flops = common.train_flops_per_token(tconfig, size.seq_len) * size.batch * size.seq_len
    result = {"model": model, "small_loss": score(small), "seed": seed, "train_batch": size.batch, "rows": []}
    log(f"[{model}] small held-out loss {result['small_loss']:.4f}")
    for init in inits:
        # The start is the operator the fit begins from: the same call with no fitting steps.
        start, _ = ligo_core.grow_model(copy.deepcopy(small), tconfig, strategy="ligo", ligo_init=init, fit_steps=0,
                                        seed=seed, device=device, tokenizer=data.tokenizer)
        start_loss = score(start)
        for fit_batch in fit_batches or [size.batch]:
            for n in steps:
                fit_flops = cost.fit_flops(small.config, tconfig, strategy="ligo", steps=n, batch=fit_batch,
                                           seq_len=size.seq_len, convention=common.FLOPS_CONVENTION)["flops"]
                for lr in lrs:
                    started = time.perf_counter()
                    large, _ = ligo_core.grow_model(
                        copy.deepcopy(small), tconfig, strategy="ligo", ligo_init=init, fit_steps=n, lr=lr,
                        train_batches=batches(data.train_tokens, fit_batch, seed=10_000 + seed), seed=seed,
                        device=device, tokenizer=data.tokenizer)
                    row = {"init": init, "batch": fit_batch, "steps": n, "lr": lr, "start_loss": start_loss,
                           "fitted_loss": score(large), "fit_train_steps": fit_flops / step_flops,
                           "seconds": time.perf_counter() - started}
                    result["rows"].append(row)
                    log(f"[{model}] {init:<8} batch {fit_batch:>3} {n:>3} steps lr {lr:.0e}: "
                        f"{start_loss:.4f} -> {row['fitted_loss']:.4f}")
    return result


def markdown(result: dict, command: str, machine: str) -> str:
    lines = [
        f"# LiGO fitting sweep: {result['model']}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}.  ",
        f"Small model held-out loss {result['small_loss']:.4f}; seed {result['seed']}. Held-out loss of the grown",
        "model before and after fitting; the fit's cost in large-model training steps (FLOPs).",
        "",
        "| start | fit batch | fit steps | peak lr | start loss | fitted loss | change | cost (training steps) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        # Rows from before the batch axis fitted with the training batch.
        batch = r.get("batch", result.get("train_batch", "-"))
        lines.append(f"| {r['init']} | {batch} | {r['steps']} | {r['lr']:.0e} | {r['start_loss']:.4f} | {r['fitted_loss']:.4f} "
                     f"| {r['fitted_loss'] - r['start_loss']:+.4f} | {r['fit_train_steps']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=common.MODELS, default="gpt2")
    p.add_argument("--size", choices=sorted(common.SIZES), default="default")
    p.add_argument("--inits", default="preserve,stack")
    p.add_argument("--steps", default="6,12,24,48")
    p.add_argument("--lrs", default="3e-4,1e-3,3e-3")
    p.add_argument("--fit-batches", help="sequences per fitting step, comma-separated (default: the training batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", help="write the table (markdown) and the rows (.json beside it) here")
    args = p.parse_args(argv)
    inits = [i for i in args.inits.split(",") if i]
    for init in inits:
        if init not in LIGO_INITS:
            p.error(f"unknown start {init!r}; choose from {', '.join(LIGO_INITS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    result = sweep(args.model, common.SIZES[args.size].for_model(args.model), inits, [int(s) for s in args.steps.split(",")],
                   [float(x) for x in args.lrs.split(",")], args.seed, default_device(args.device),
                   fit_batches=[int(b) for b in args.fit_batches.split(",")] if args.fit_batches else None)
    text = markdown(result, "python -m bench.fit_sweep " + " ".join(argv if argv is not None else sys.argv[1:]),
                    common.machine())
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
