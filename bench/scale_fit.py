"""Peak memory and time of ONE LiGO fitting step at real GPT-2 sizes, before and after layer-by-layer
fitting, against one plain AdamW training step of the target (issue 18).

    python -m bench.scale_fit                       # 124M -> gpt2-medium, gpt2-large; AdamW of gpt2-large
    python -m bench.scale_fit --targets gpt2-large --paths layerwise adamw

Every measurement runs in a fresh child process (``python -m bench.scale_fit --child ...``) that
reports its own peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and its RSS once the
step's inputs are built (the small model's fp32 weights and the operator), so the step's own
working set is the difference. Weights are random at the real shapes (the presets of
ligo_core/targets.py); the batch is random token ids. ``dense`` is the whole-model fit
(``fit_operator(layerwise=False)``), ``layerwise`` the default one (ligo_core/layerwise.py), both
with the engine's LiGO defaults (copies moved apart, spread 2). Rows are appended to
docs/results/scale_fit.jsonl with the command and the machine.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import sys
import time

import torch

from bench.common import ROOT, machine, run_module
from bench.report import markdown_table
from ligo_core import memory_plan

RESULTS = ROOT / "docs" / "results" / "scale_fit.jsonl"
GiB = 2**30


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_step_peak() -> None:
    """Start the kernel's high-water mark of this process's RSS (VmHWM) again from its RSS now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def step_peak_bytes() -> int:
    """The RSS high-water mark since ``reset_step_peak`` (the process's peak before the step, such as
    the whole operator a rank builds before it shards it, is left out)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _child(path: str, source: str, target: str, batch: int, seq: int) -> dict:
    """One measurement, in this (fresh) process."""
    from transformers import GPT2LMHeadModel

    from ligo_core.growth import _move_buffers, fit_operator, plan_layout
    from ligo_core.objective import lm_loss
    from ligo_core.separation import separation_offsets
    from ligo_core.strategies import build_operator, default_spread
    from ligo_core.targets import resolve_target, sizes_of
    from ligo_core.training import default_device

    device = default_device(None)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # a rank of ``--nproc``: the operator is sharded over the ranks (ligo_core/sharding.py)
        import torch.distributed as dist

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    small_config = resolve_target(source)
    target_config = resolve_target(target, small_config)
    ids = torch.randint(0, small_config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    row = {"path": path, "source": source, "target": target, "batch": batch, "seq_len": seq, "processes": world,
           "target_parameters": None, "operator_parameters": None}
    if path == "adamw":  # the target trained directly: weights, gradients, AdamW's two moments, activations
        model = GPT2LMHeadModel(target_config).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        row["target_parameters"] = sum(p.numel() for p in model.parameters())
        row["rss_before_step"] = rss_bytes()
        started = time.perf_counter()
        loss = lm_loss(model, ids.to(device), "clm")
        loss.backward()
        optimizer.step()
        row["loss"] = float(loss)
    else:
        small = GPT2LMHeadModel(small_config)
        state = {k: v.detach().to(device=device, dtype=torch.float32) for k, v in small.state_dict().items()}
        del small
        layout = plan_layout(small_config, {k: tuple(v.shape) for k, v in state.items()})
        operator = build_operator("ligo", layout.family, layout.specs, sizes_of(small_config), sizes_of(target_config),
                                  layout.head_tied, seed=0, spread=default_spread("ligo")).to(device)
        with torch.device("meta"):  # the large model's structure only: its weights come from the operator
            skeleton = GPT2LMHeadModel(target_config)
        _move_buffers(skeleton, device)
        row["target_parameters"] = sum(p.numel() for p in skeleton.parameters())
        row["operator_parameters"] = operator.num_parameters()
        row["operator_parameters_formula"] = memory_plan.operator_parameters(
            memory_plan.shape_of(small_config.to_dict()), memory_plan.shape_of(target_config.to_dict()),
            sum(s.per_layer for s in layout.specs))
        by_name = {}
        for spec in layout.specs:
            full = layout.names[spec.name]
            for layer in range(operator.large_layers) if spec.per_layer else [None]:
                by_name[full if layer is None else full.format(i=layer)] = (spec, full, layer)
        offsets = separation_offsets(lambda name: operator.fixed_tensor(*_at(by_name[name], state)), operator,
                                     layout.names, operator.spread, torch.Generator().manual_seed(2))
        gc.collect()
        row["rss_before_step"] = rss_bytes()
        reset_step_peak()
        started = time.perf_counter()
        history = fit_operator(operator, skeleton, state, layout, iter([ids]), 1, 1e-4, {}, device, 0,
                               offsets=offsets, layerwise=path == "layerwise")
        row["loss"] = history[0][1]
    row["step_seconds"] = round(time.perf_counter() - started, 2)
    row["peak_rss"] = peak_bytes()
    row["step_peak_rss"] = step_peak_bytes()
    if device.type == "cuda":
        row["peak_cuda"] = torch.cuda.max_memory_allocated()
    row["layer_parameters"] = 12 * target_config.n_embd**2 + 13 * target_config.n_embd  # one GPT-2 block
    row["machine"] = machine(device)
    return row


def _at(entry, state):
    spec, full, layer = entry
    return spec, state, full, layer


GPU_BYTES = 80e9
# Growths whose fitting memory on one 80 GB GPU the plan works out (source, target, family tensors per layer).
PLAN = (("gpt2", "gpt2-medium", 12), ("gpt2", "gpt2-large", 12), ("gpt2", "gpt2-xl", 12),
        ("tinyllama-1.1b", "llama-2-7b", 9), ("llama-3.2-1b", "llama-3.1-8b", 9), ("qwen2-1.5b", "qwen2-7b", 9),
        ("mistral-7b", "layers=48", 9), ("llama-3.1-8b", "layers=40", 9))


def layer_factor(rows: list[dict]) -> float:
    """The measured working set of a layer-by-layer step beyond its fixed terms, in fp32 large layers:
    (peak - RSS before the step - the operator's gradient and AdamW moments (12 bytes a parameter))
    / (4 bytes x one large layer's parameters); the largest over the targets' latest rows."""
    latest = {(r["source"], r["target"]): r for r in rows
              if r.get("path") == "layerwise" and "error" not in r and r.get("processes", 1) == 1}
    return max((r["peak_rss"] - r["rss_before_step"] - 12 * r["operator_parameters"]) / (4 * r["layer_parameters"])
               for r in latest.values())


def plan(k: float) -> str:
    """Predicted bf16 peak of a layer-by-layer fitting step on one GPU, from the measured terms:
    small model in fp32 (4 bytes a parameter) + operator, its gradient and AdamW moments (16) +
    ``k`` large layers in bf16 (2 bytes a parameter; ``k`` counts the layer's weights, gradients,
    the operator's intermediates and the block's activations, measured in fp32 at batch 2 x 128)."""
    from ligo_core import cost
    from ligo_core.targets import family_of, resolve_target, sizes_of

    rows = []
    for source, target, layer_specs in PLAN:
        sc = resolve_target(source)
        tc = resolve_target(target, sc)
        large_sizes = sizes_of(tc)
        small_shape, large_shape = memory_plan.shape_of(sc.to_dict()), memory_plan.shape_of(tc.to_dict())
        op = memory_plan.operator_parameters(small_shape, large_shape, layer_specs)
        shallower = copy.deepcopy(tc)
        setattr(shallower, family_of(tc).config_keys["layers"], large_sizes["layers"] - 1)
        layer = cost.num_parameters(tc) - cost.num_parameters(shallower)
        terms = 4 * cost.num_parameters(sc), 16 * op, k * 2 * layer
        total = sum(terms)

        # each of n GPUs: 1/n of the per-layer expanders (ligo_core/sharding.py), whole after the fit
        sharded = {n: terms[0] + terms[2] + memory_plan.operator_bytes(small_shape, large_shape, n, layer_specs)
                   for n in (2, 8)}
        rows.append([f"{source} -> {target}", f"{cost.num_parameters(sc) / 1e9:.2f}B",
                     f"{cost.num_parameters(tc) / 1e9:.2f}B", f"{op / 1e9:.2f}B", f"{terms[0] / 1e9:.1f} GB",
                     f"{terms[1] / 1e9:.1f} GB", f"{terms[2] / 1e9:.1f} GB", f"{total / 1e9:.1f} GB",
                     "yes" if total < GPU_BYTES else "no", f"{sharded[2] / 1e9:.1f} GB", f"{sharded[8] / 1e9:.1f} GB"])
    return markdown_table(["growth", "small", "target", "operator", "small fp32", "operator + AdamW",
                           "one layer x k (bf16)", "predicted peak", "fits 80 GB", "per GPU, 2 GPUs",
                           "per GPU, 8 GPUs"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale_fit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="gpt2")
    parser.add_argument("--targets", nargs="+", default=["gpt2-medium", "gpt2-large"])
    parser.add_argument("--paths", nargs="+", default=["dense", "layerwise", "adamw"],
                        choices=["dense", "layerwise", "adamw"])
    parser.add_argument("--adamw-target", default="gpt2-large", help="the target trained plainly (path adamw)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--nproc", type=int, default=1,
                        help="run the layer-by-layer step in N gloo processes (the operator sharded over them); "
                             "the row's peaks are the largest rank's")
    parser.add_argument("--no-record", action="store_true", help="print the table only")
    parser.add_argument("--child", nargs=3, metavar=("PATH", "SOURCE", "TARGET"), help=argparse.SUPPRESS)
    parser.add_argument("--plan", action="store_true",
                        help="only work out, from the recorded layer-by-layer rows, what one 80 GB GPU can fit")
    args = parser.parse_args(argv)
    if args.plan:
        rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
        k = layer_factor(rows)
        print(f"measured working set of one layer-by-layer step: k = {k:.1f} fp32 large layers\n")
        print(plan(k))
        return 0
    if args.child:
        print("ROW " + json.dumps(_child(*args.child, args.batch, args.seq_len)), flush=True)
        return 0
    # Tensors from 128 KiB up are mapped and unmapped by glibc rather than kept in its heap once freed,
    # so RSS follows the live tensors (glibc's default threshold rises to 32 MiB as big blocks are
    # freed, and a freed per-layer expander then stays counted).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    runs = [(p, t) for t in args.targets for p in args.paths if p != "adamw"]
    if "adamw" in args.paths:
        runs.append(("adamw", args.adamw_target))
    rows = []
    command = "python -m bench.scale_fit " + " ".join(argv if argv is not None else sys.argv[1:])
    for path, target in runs:
        try:
            child = ["--child", path, args.source, target, "--batch", str(args.batch), "--seq-len", str(args.seq_len)]
            if args.nproc > 1 and path == "layerwise":
                done = run_module("torch.distributed.run", ["--standalone", f"--nproc-per-node={args.nproc}", "-m",
                                                            "bench.scale_fit", *child], capture_output=True, text=True)
            else:
                done = run_module("bench.scale_fit", child, capture_output=True, text=True)
            ranks = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
            row = dict(ranks[0])
            for key in ("peak_rss", "step_peak_rss", "rss_before_step"):  # the largest rank's
                row[key] = max(r[key] for r in ranks)
        except Exception as exc:  # out of memory (killed) or a failure: a row that says so
            stderr = getattr(exc, "stderr", "") or ""
            row = {"path": path, "source": args.source, "target": target, "error": f"{exc}: {stderr[-500:]}"}
        row["command"] = command
        rows.append(row)
        print(_line(row), flush=True)
        if not args.no_record:
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            with open(RESULTS, "a") as f:
                f.write(json.dumps(row) + "\n")
    print()
    print(table(rows))
    return 0


def _line(row: dict) -> str:
    if "error" in row:
        return f"{row['path']:9s} {row['source']} -> {row['target']}: FAILED {row['error'][:200]}"
    return (f"{row['path']:9s} {row['source']} -> {row['target']} x{row.get('processes', 1)}: "
            f"peak {_step_peak(row) / GiB:.2f} GiB, step {row['step_seconds']:.1f} s, loss {row['loss']:.3f}")


def _step_peak(row: dict) -> int:
    """The step's peak RSS: the high-water mark from the step's start where recorded, else the process's."""
    return row.get("step_peak_rss", row["peak_rss"])


def table(rows: list[dict]) -> str:
    """The markdown table of docs/BENCHMARKS.md (a rank's numbers for several processes: the largest)."""
    cuda = any("peak_cuda" in r for r in rows)  # a GPU run: the device's peak is the number that matters
    out = ["| step | processes | target (params) | operator params | RSS before step (GiB) | step peak RSS (GiB) | "
           "step's own (GiB) | step time (s) |" + (" peak CUDA (GiB) |" if cuda else ""),
           "|---|---|---|---|---|---|---|---|" + ("---|" if cuda else "")]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['path']} | {r.get('processes', 1)} | {r['target']} | - | - | failed | - | - |"
                       + (" - |" if cuda else ""))
            continue
        own = (_step_peak(r) - r["rss_before_step"]) / GiB
        op = f"{r['operator_parameters'] / 1e6:.0f}M" if r.get("operator_parameters") else "-"
        out.append(f"| {r['path']} | {r.get('processes', 1)} | {r['target']} ({r['target_parameters'] / 1e6:.0f}M) | "
                   f"{op} | {r['rss_before_step'] / GiB:.2f} | {_step_peak(r) / GiB:.2f} | {own:.2f} | "
                   f"{r['step_seconds']:.1f} |" + (f" {r.get('peak_cuda', 0) / GiB:.2f} |" if cuda else ""))
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
