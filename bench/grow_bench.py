"""What does growing cost?  GPT-2 124M shape -> GPT-2 355M shape (random weights).

Two questions from issue 2:

1. Applying a fixed operator (``preserve``: build it, materialise under no_grad, load into the
   model) versus writing the grown model to disk with ``save_pretrained`` (safetensors).
   Goal: applying costs no more than writing.
2. One ``ligo`` fitting step (``ligo_core.growth.fit_operator``: materialise with grad, forward
   and backward of the large model through ``torch.func.functional_call``, AdamW step on the
   operator) versus one plain AdamW training step of the large model on the same batch.
   Goal: a fitting step costs at most 1.3x a plain step.

Every phase runs in its own child process, so that at most one large model is alive at a
time and each phase's peak memory is its own (RSS sampled by a thread on CPU,
``torch.cuda.max_memory_allocated`` on CUDA; both above the process's footprint after imports).
Times are medians over ``--repeats`` steps after ``--warmup`` steps (with the defaults, one and
one, a run takes about 7 minutes on 2 quiet CPU cores). ``--accumulate N`` makes both steps
draw N batches (the fitting step applies the operator once for all of them).
``--profile`` instead prints the top operators of materialise (no_grad, and with grad plus
backward).  Memory: at 4 x 512 tokens both training steps peak near 20 GiB RSS on CPU.

    python -m bench.grow_bench [--batch 4] [--seq 512] [--second-batch 1] [--repeats 1]
                               [--warmup 1] [--device cpu|cuda] [--profile]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import ligo_core
from bench.common import machine, run_module
from ligo_core import cost
from ligo_core.growth import (
    _scaled_eps,
    _strip_parameters,
    build_operator,
    fit_operator,
    load_grown_weights,
    plan_layout,
)
from ligo_core.objective import lm_loss, tokenizer_info

GIB = 2**30
RESULT = "RESULT "


# ---- measuring -----------------------------------------------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory between start() and stop(), above ``base`` (RSS on CPU, allocator on CUDA)."""

    def __init__(self, device: torch.device, base: int):
        self.device, self.base, self.peak = device, base, 0
        self._stop = threading.Event()

    def now(self) -> int:
        return torch.cuda.memory_allocated() if self.device.type == "cuda" else rss_bytes()

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def start(self):
        self.peak = self.now()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> float:
        """Peak in GiB above the base."""
        if self.device.type == "cuda":
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())
        return (self.peak - self.base) / GIB


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ---- the models ----------------------------------------------------------------------------------

def setup(strategy: str, device: torch.device):
    """Small GPT-2 124M state (random), its layout, the operator and a weightless 355M skeleton,
    set up exactly as ``ligo_core.growth.grow_model`` does."""
    torch.manual_seed(0)
    small = GPT2LMHeadModel(GPT2Config())
    small_config = small.config
    state = {k: v.detach() for k, v in small.state_dict().items()}
    del small
    target = ligo_core.resolve_target("gpt2-medium", small_config)
    layout = plan_layout(small_config, {k: tuple(v.shape) for k, v in state.items()})
    operator = build_operator(
        strategy, layout.family, layout.specs, ligo_core.sizes_of(small_config), ligo_core.sizes_of(target),
        layout.head_tied, seed=0,
    )
    target = _scaled_eps(target, layout.family, operator.norm_scale)
    small_state = {k: v.to(device=device, dtype=torch.float32) for k, v in state.items()}
    del state
    with torch.device("meta"):  # GPT-2 has no buffers: nothing to move, no random init to pay for
        skeleton = GPT2LMHeadModel(target)
    _strip_parameters(skeleton)
    operator.to(device)
    gc.collect()
    return small_config, target, layout, operator, small_state, skeleton


def token_batches(vocab: int, batch: int, seq: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.randint(vocab, (batch, seq), generator=g).to(device)


# ---- phases (each in its own process) ------------------------------------------------------------

def phase_apply(args, device, base) -> dict:
    small_config, target, layout, operator, small_state, skeleton = setup("preserve", device)
    build_s, mat_s, load_s, mat_peak = [], [], [], 0.0
    model = None
    for _ in range(args.warmup + args.repeats):
        del model, operator
        gc.collect()
        _strip_parameters(skeleton)
        mem = PeakMemory(device, base).start()
        t0 = time.perf_counter()
        # As grow_model does: a fresh operator every time (nothing cached from the last repetition).
        operator = build_operator("preserve", layout.family, layout.specs, ligo_core.sizes_of(small_config),
                                  ligo_core.sizes_of(target), layout.head_tied, seed=0).to(device)
        t1 = time.perf_counter()
        with torch.no_grad():
            large = operator.materialise(small_state, layout.names)
        sync(device)
        t2 = time.perf_counter()
        model = load_grown_weights(skeleton, {k: v.contiguous() for k, v in large.items()})
        del large
        sync(device)
        t3 = time.perf_counter()
        mat_peak = max(mat_peak, mem.stop())
        build_s.append(t1 - t0)
        mat_s.append(t2 - t1)
        load_s.append(t3 - t0)
    model = model.to("cpu")
    num_params = sum(p.numel() for p in model.parameters())
    save_s, fsync_s, save_peak, size = [], [], 0.0, 0
    root = Path(tempfile.mkdtemp(prefix="grow_bench-", dir=args.tmp))
    try:
        for r in range(args.warmup + args.repeats):
            out = root / f"run{r}"
            mem = PeakMemory(torch.device("cpu"), rss_bytes() if device.type == "cuda" else base).start()
            t0 = time.perf_counter()
            model.save_pretrained(out, safe_serialization=True)
            t1 = time.perf_counter()
            for f in out.iterdir():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
            t2 = time.perf_counter()
            save_peak = max(save_peak, mem.stop())
            size = sum(f.stat().st_size for f in out.iterdir())
            save_s.append(t1 - t0)
            fsync_s.append(t2 - t0)
            # Kept until the end: deleting it would let the next write reuse its page-cache pages,
            # which made a repeated write look 10x faster (0.34 s against 3.3 s) than a first one.
    finally:
        shutil.rmtree(root, ignore_errors=True)
    w = args.warmup
    return {
        "build_s": median(build_s[w:]), "materialise_s": median(mat_s[w:]), "materialise_all_s": mat_s,
        "materialise_load_s": median(load_s[w:]), "materialise_peak_gib": mat_peak,
        "save_s": median(save_s[w:]), "save_all_s": save_s, "save_fsync_s": median(fsync_s[w:]),
        "save_peak_gib": save_peak, "save_bytes": size, "large_parameters": num_params,
        "operator_parameters": operator.num_parameters(),
        "operator_gflop": cost.operator_flops(small_config, target) / 1e9,
    }


def phase_fit(args, device, base) -> dict:
    small_config, target, layout, operator, small_state, skeleton = setup("ligo", device)
    steps = args.warmup + args.repeats
    stamps = []
    mem = PeakMemory(device, base).start()
    t0 = time.perf_counter()
    fit_operator(
        operator, skeleton, small_state, layout, token_batches(target.vocab_size, args.batch, args.seq, device),
        steps, 1e-3, tokenizer_info(None, small_config), device, 0,
        progress=lambda event: stamps.append(time.perf_counter()), accumulate=args.accumulate,
    )
    peak = mem.stop()
    step_s = [b - a for a, b in zip([t0] + stamps[:-1], stamps)]
    result = {"step_s": median(step_s[args.warmup:]), "all_s": step_s, "peak_gib": peak,
              "operator_parameters": operator.num_parameters()}
    if args.breakdown:
        result.update(operator_breakdown(device, operator, small_state, layout))
    return result


def operator_breakdown(device, operator, small_state, layout) -> dict:
    """Where a fitting step's extra time goes: materialise with grad, and its backward
    (run once, after the fitting steps have warmed the allocator up)."""
    operator.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    large = operator.materialise(small_state, layout.names)
    sync(device)
    t1 = time.perf_counter()
    tensors = list(large.values())
    torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])
    sync(device)
    t2 = time.perf_counter()
    return {"materialise_grad_s": t1 - t0, "materialise_backward_s": t2 - t1}


def phase_plain(args, device, base) -> dict:
    torch.manual_seed(0)
    target = ligo_core.resolve_target("gpt2-medium", GPT2Config())
    model = GPT2LMHeadModel(target).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.01)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    batches = token_batches(target.vocab_size, args.batch, args.seq, device)
    step_s = []
    mem = PeakMemory(device, base).start()
    for _ in range(args.warmup + args.repeats):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for _ in range(args.accumulate):
            with autocast:
                loss = lm_loss(model, next(batches), "clm") / args.accumulate
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss.item()
        step_s.append(time.perf_counter() - t0)
    peak = mem.stop()
    return {"step_s": median(step_s[args.warmup:]), "all_s": step_s, "peak_gib": peak}


def phase_profile(args, device, base) -> dict:
    """Top operators of materialise: the fixed operator under no_grad, and the ligo operator
    with grad plus its backward (each after one warmup run), by self time."""
    return {strategy: profile_materialise(strategy, device, args.profile_rows) for strategy in ("preserve", "ligo")}


def profile_materialise(strategy: str, device: torch.device, rows: int) -> str:
    _, _, layout, operator, small_state, _ = setup(strategy, device)
    learned = strategy == "ligo"

    def run():
        with torch.set_grad_enabled(learned):
            large = operator.materialise(small_state, layout.names)
            if learned:
                tensors = list(large.values())
                torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])
        sync(device)

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    run()
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        run()
        wall = time.perf_counter() - t0
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return f"{wall:.2f} s wall\n" + prof.key_averages().table(sort_by=sort, row_limit=rows)


PHASES = {"apply": phase_apply, "fit": phase_fit, "plain": phase_plain, "profile": phase_profile}


def run_child(args, phase: str, batch: int, breakdown: bool = False) -> dict:
    child = ["--phase", phase, "--batch", str(batch), "--seq", str(args.seq),
             "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--device", args.device,
             "--accumulate", str(args.accumulate),
             "--profile-rows", str(args.profile_rows)] + (["--tmp", str(Path(args.tmp).resolve())] if args.tmp else [])
    child += ["--breakdown"] if breakdown else []
    print(f"[{time.strftime('%H:%M:%S')}] {phase} (batch {batch} x seq {args.seq}) ...", file=sys.stderr, flush=True)
    done = run_module("bench.grow_bench", child, stdout=subprocess.PIPE, text=True)
    line = next(line for line in reversed(done.stdout.splitlines()) if line.startswith(RESULT))
    result = json.loads(line[len(RESULT):])
    if phase != "profile":
        print(f"    {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


# ---- report --------------------------------------------------------------------------------------

def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def report(args, apply: dict, rows: list[dict], started: str) -> str:
    gb = apply["save_bytes"] / 1e9
    lines = [
        f"Machine: {machine(torch.device(args.device))}; device `{args.device}`.",
        f"Load average at start {started}, at end {loadavg()}.",
        f"Large model: {apply['large_parameters'] / 1e6:.1f}M parameters; ligo operator: "
        f"{rows[0]['fit']['operator_parameters'] / 1e6:.1f}M parameters; materialise: "
        f"{apply['operator_gflop']:.0f} GFLOP forward (`cost.operator_flops`).",
        f"Median of {args.repeats} after {args.warmup} warmup; memory is peak above the process after imports "
        f"({'RSS' if args.device == 'cpu' else 'CUDA allocated'}).",
        "",
        "| fixed operator (`preserve`) | median s | peak GiB |",
        "|---|---:|---:|",
        f"| build the operator | {apply['build_s']:.2f} | |",
        f"| materialise (no_grad) | {apply['materialise_s']:.2f} | {apply['materialise_peak_gib']:.2f} |",
        f"| build + materialise + load into the model | {apply['materialise_load_s']:.2f} | |",
        f"| `save_pretrained` (safetensors, {gb:.2f} GB) | {apply['save_s']:.2f} | {apply['save_peak_gib']:.2f} |",
        f"| `save_pretrained` + fsync | {apply['save_fsync_s']:.2f} | |",
        "",
        f"Apply / write: {apply['materialise_load_s'] / apply['save_s']:.2f}x "
        f"(goal <= 1: {'met' if apply['materialise_load_s'] <= apply['save_s'] else 'NOT met'}).",
        "",
        "| tokens (batch x seq) | plain step s | ligo fit step s | ratio | plain peak GiB | fit peak GiB "
        "| materialise (grad) s | its backward s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p, f = r["plain"], r["fit"]
        acc = f" x {args.accumulate}" if args.accumulate > 1 else ""
        lines.append(
            f"| {r['batch'] * args.seq * args.accumulate} ({r['batch']} x {args.seq}{acc}) | {p['step_s']:.2f} | {f['step_s']:.2f} "
            f"| {f['step_s'] / p['step_s']:.2f} | {p['peak_gib']:.2f} | {f['peak_gib']:.2f} "
            f"| {_num(f.get('materialise_grad_s'))} | {_num(f.get('materialise_backward_s'))} |"
        )
    main = rows[0]
    ratio = main["fit"]["step_s"] / main["plain"]["step_s"]
    lines += ["", f"Fit / plain at {main['batch'] * args.seq * args.accumulate} tokens: {ratio:.2f}x "
                  f"(goal <= 1.3: {'met' if ratio <= 1.3 else 'NOT met'})."]
    if len(rows) == 2:
        # step time ~ a + b * tokens for both; the operator's work is the same whatever the batch
        (t1, p1, f1), (t2, p2, f2) = [(r["batch"] * args.seq * args.accumulate, r["plain"]["step_s"], r["fit"]["step_s"])
                                      for r in rows]
        if t1 != t2:
            bp, bf = (p1 - p2) / (t1 - t2), (f1 - f2) / (t1 - t2)
            ap, af = p1 - bp * t1, f1 - bf * t1
            if bf < 1.3 * bp:
                need = (af - 1.3 * ap) / (1.3 * bp - bf)
                lines.append(f"Linear fit through both token counts: ratio 1.3 is reached from about "
                             f"{max(need, 0):.0f} tokens per step.")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--second-batch", type=int, default=1, help="second token count (batch x seq); 0 skips")
    ap.add_argument("--accumulate", type=int, default=1,
                    help="batches per step (fit: the operator runs once per step; plain: gradient accumulation)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tmp", default=None, help="directory for the save test (default: system temp)")
    ap.add_argument("--profile", action="store_true",
                    help="instead: print the top ops of materialise (no_grad, and with grad + backward)")
    ap.add_argument("--profile-rows", type=int, default=20)
    ap.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    ap.add_argument("--breakdown", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)

    if args.phase:  # child process: one phase, one JSON line
        base = torch.cuda.memory_allocated() if device.type == "cuda" else rss_bytes()
        print(RESULT + json.dumps(PHASES[args.phase](args, device, base)), flush=True)
        return

    started = loadavg()
    wall = time.perf_counter()
    if args.profile:
        tables = run_child(args, "profile", args.batch)
        print(f"Load average at start {started}, at end {loadavg()}.")
        print("\nmaterialise, fixed operator (preserve), no_grad:\n```\n" + tables["preserve"] + "```")
        print("\nmaterialise + backward, ligo operator:\n```\n" + tables["ligo"] + "```")
    else:
        apply = run_child(args, "apply", args.batch)
        rows = []
        for n, batch in enumerate([args.batch] + ([args.second_batch] if args.second_batch else [])):
            fit = run_child(args, "fit", batch, breakdown=n == 0)
            rows.append({"batch": batch, "fit": fit, "plain": run_child(args, "plain", batch)})
        print(report(args, apply, rows, started))
    print(f"\nBenchmark wall time: {time.perf_counter() - wall:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
