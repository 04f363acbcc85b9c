"""Do copied units stay copies?  Symmetry breaking after growth, measured.

A function-preserving growth makes every new unit a copy of an old one. Under AdamW the copies
separate only as fast as the growth makes them differ: AdamW's step ignores a gradient's scale,
so copies whose gradients differ only by a factor take identical steps, and the copies in a new
block whose outputs start at zero get identical gradients outright. This grows the savings
benchmark's small GPT-2 with ``preserve`` at each ``--noises`` value (the engine's symmetry
breaking of the input shares) and ``--spreads`` value (how far the copies' incoming weights are
moved apart after growth), trains every grown model with the benchmark's recipe, and prints how
alike the copies still are (mean cosine of their incoming weights, at the start and after
training; a random pair of distinct units for scale) and the held-out loss.

    python -m bench.symmetry [--noises 1.0] [--spreads 0,1,2] [--steps 600] [--strategy preserve]
"""

from __future__ import annotations

import argparse
import copy

import torch

import ligo_core
from bench import common
from ligo_core.allocator import keep_freed_memory
from ligo_core.data import batches
from ligo_core.training import default_device, train

# What to look at: a tensor whose columns are the units (GPT-2's Conv1D stores (in, out)), and
# for the fused attention projection which part (0 queries, 1 keys, 2 values), else None.
PROBES = {
    "FFN units, first layer": ("transformer.h.0.mlp.c_fc.weight", None),
    "FFN units, last layer": ("transformer.h.{last}.mlp.c_fc.weight", None),
    "residual units (embedding)": ("transformer.wte.weight", None),
    "attention values, first layer": ("transformer.h.0.attn.c_attn.weight", 2),
    "attention queries, first layer": ("transformer.h.0.attn.c_attn.weight", 0),
}


def probe_units(state: dict, tensor: str, part: int | None) -> torch.Tensor:
    weight = state[tensor]
    if part is None:
        return weight
    width = weight.shape[1] // 3
    return weight[:, part * width:(part + 1) * width]


def copy_groups(weight: torch.Tensor) -> list[list[int]]:
    """Units (columns) whose incoming weights point the same way: the copies of one old unit.
    Direction, not value: the engine may scale a copy's incoming weights."""
    directions = torch.nn.functional.normalize(weight.T.double(), dim=1)
    groups: dict[tuple, list[int]] = {}
    for unit, d in enumerate(directions):
        groups.setdefault(tuple(torch.round(d * 1e4).tolist()), []).append(unit)
    return [g for g in groups.values() if len(g) > 1]


def copy_cosine(weight: torch.Tensor, groups: list[list[int]]) -> float:
    """Mean cosine between the incoming weights of copies of the same old unit."""
    cols = weight.T
    pairs = [(a, b) for g in groups for i, a in enumerate(g) for b in g[i + 1:]]
    if not pairs:
        return float("nan")
    a, b = zip(*pairs)
    return torch.nn.functional.cosine_similarity(cols[list(a)], cols[list(b)], dim=1).mean().item()


def random_cosine(weight: torch.Tensor, samples: int = 2000) -> float:
    """Mean |cosine| of random pairs of distinct units: what unrelated units look like."""
    cols = weight.T
    g = torch.Generator().manual_seed(0)
    i, j = torch.randint(len(cols), (samples,), generator=g), torch.randint(len(cols), (samples,), generator=g)
    keep = i != j
    return torch.nn.functional.cosine_similarity(cols[i[keep]], cols[j[keep]], dim=1).abs().mean().item()


def measure(strategy: str, noises: list[float], spreads: list[float], steps: int, size: common.Size, device,
            log=print) -> list[dict]:
    data = common.prepare("gpt2", size)
    score = common.loss_scorer(data, device)
    small, _ = common.pretrain_small("gpt2", size, data, device, log)
    tconfig = common.target_config(small.config, size.large)
    probes = {name: (t.format(last=size.large[0] - 1), part) for name, (t, part) in PROBES.items()}

    def grow(noise: float, spread: float):
        large, _ = ligo_core.grow_model(copy.deepcopy(small), tconfig, strategy=strategy, fit_steps=0, seed=0,
                                        device=device, tokenizer=data.tokenizer, noise=noise, spread=spread)
        return large

    rows = []
    for noise in noises:
        # Which units are copies: read off the unseparated growth (same seed, same placement).
        exact = grow(noise, 0.0).state_dict()
        groups = {name: copy_groups(probe_units(exact, *probe)) for name, probe in probes.items()}
        for spread in spreads:
            large = grow(noise, spread)
            for p in large.parameters():
                p.requires_grad_(True)
            start = {k: v.detach().clone() for k, v in large.state_dict().items()}
            row = {"noise": noise, "spread": spread, "start_loss": score(large), "probes": {}}
            train(large, batches(data.train_tokens, size.batch, seed=0), steps, lr=size.lr,
                  warmup=size.warmup(steps), weight_decay=size.weight_decay, objective=data.objective,
                  tokenizer_info=data.info, seed=0, device=device)
            end = {k: v.detach().cpu() for k, v in large.state_dict().items()}
            row["loss"] = score(large)
            for name, probe in probes.items():
                before, after = probe_units(start, *probe), probe_units(end, *probe)
                row["probes"][name] = {"groups": len(groups[name]), "start_cos": copy_cosine(before, groups[name]),
                                       "copy_cos": copy_cosine(after, groups[name]),
                                       "random_cos": random_cosine(after)}
            rows.append(row)
            log(f"noise {noise} spread {spread}: loss {row['start_loss']:.4f} -> {row['loss']:.4f}; " + ", ".join(
                f"{n}: {p['start_cos']:.4f} -> {p['copy_cos']:.4f}" for n, p in row["probes"].items()))
    return rows


def markdown(rows: list[dict], strategy: str, steps: int) -> str:
    names = list(PROBES)
    lines = [
        f"`{strategy}` growth, then {steps} AdamW steps. Copies: mean cosine of the incoming weights of units",
        "that started as copies of one old unit (1 = still copies), at the start and after training;",
        "random: mean |cosine| of distinct units after training.",
        "",
        "| noise | spread | held-out loss, start | after training | "
        + " | ".join(f"{n}: copies start / end / random" for n in names) + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        cells = [f"{r['probes'][n]['start_cos']:.3f} / {r['probes'][n]['copy_cos']:.4f} / "
                 f"{r['probes'][n]['random_cos']:.2f}" for n in names]
        lines.append(f"| {r['noise']} | {r['spread']} | {r['start_loss']:.4f} | {r['loss']:.4f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--noises", default="1.0")
    p.add_argument("--spreads", default="0,1,2")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--strategy", default="preserve", choices=[s for s in ligo_core.STRATEGIES if s != "ligo"])
    p.add_argument("--size", choices=sorted(common.SIZES), default="default")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    rows = measure(args.strategy, [float(n) for n in args.noises.split(",")],
                   [float(s) for s in args.spreads.split(",")], args.steps, common.SIZES[args.size].for_model("gpt2"),
                   default_device(args.device))
    print(markdown(rows, args.strategy, args.steps))
    return rows


if __name__ == "__main__":
    main()
