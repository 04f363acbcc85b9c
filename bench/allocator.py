"""What keeping freed memory in malloc's heap saves per CPU training step.

Interleaved A/B, one fresh process per measurement (glibc's malloc settings hold for a whole
process): the savings benchmark's large GPT-2 and BERT (``bench.savings``' default size), the
engine's training loop on random tokens, with glibc's defaults against
``ligo_core.allocator.keep_freed_memory``. Prints milliseconds per step.

    python -m bench.allocator [--rounds 3] [--steps 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from types import SimpleNamespace

import torch

from bench import common
from ligo_core.allocator import keep_freed_memory
from ligo_core.training import train

ARMS = {"glibc defaults": False, "freed memory kept (engine)": True}


def time_steps(model_name: str, steps: int) -> float:
    """Milliseconds per step of ``ligo_core.training.train`` (the loop every benchmark run uses) on
    the savings benchmark's large ``model_name``, one batch of random tokens repeated."""
    size = common.SIZES["default"].for_model(model_name)
    config = common.make_config(model_name, size.large, size.vocab, size.seq_len,
                                 SimpleNamespace(eos_token_id=0, pad_token_id=0))
    torch.manual_seed(0)
    model = common.model_class(model_name)(config)
    ids = torch.randint(5, size.vocab, (size.batch, size.seq_len), generator=torch.Generator().manual_seed(0))
    recipe = dict(lr=1e-4, weight_decay=size.weight_decay, objective="clm" if model_name == "gpt2" else "mlm",
                  tokenizer_info={"mask_id": 4, "vocab_size": size.vocab, "special_ids": []}, device="cpu")
    train(model, itertools.repeat(ids), 3, **recipe)  # warm
    return train(model, itertools.repeat(ids), steps, **recipe)["train_time"] / steps * 1000


def measure_in_child(model_name: str, keep: bool, steps: int, threads: int | None) -> float:
    args = ["--child", model_name, "--steps", str(steps)]
    args += ["--keep-freed"] if keep else []
    args += ["--threads", str(threads)] if threads else []
    out = common.run_module("bench.allocator", args, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[tuple[str, str], float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="gpt2,bert")
    p.add_argument("--rounds", type=int, default=3, help="A/B rounds (default 3)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per process (default 30)")
    p.add_argument("--threads", type=int)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--keep-freed", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.keep_freed and not keep_freed_memory():
            raise SystemExit("this C library has no glibc mallopt: nothing to compare")
        print(f"{time_steps(args.child, args.steps):.3f}")
        return {}

    models = [m for m in args.models.split(",") if m]
    times: dict[tuple[str, str], list[float]] = {(m, arm): [] for m in models for arm in ARMS}
    for _ in range(args.rounds):
        for m in models:
            for arm, keep in ARMS.items():
                times[(m, arm)].append(measure_in_child(m, keep, args.steps, args.threads))
    medians = {key: statistics.median(t) for key, t in times.items()}
    print(f"bench/savings.py's large models, {args.threads or torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds of {args.steps} steps, one process each")
    print("| model | " + " | ".join(f"{arm}: ms per step" for arm in ARMS) + " | time saved |")
    print("|---|" + "---:|" * (len(ARMS) + 1))
    for m in models:
        base, kept = (medians[(m, arm)] for arm in ARMS)
        print(f"| {m} | {base:.0f} | {kept:.0f} | {1 - kept / base:.0%} |")
    return medians


if __name__ == "__main__":
    main()
