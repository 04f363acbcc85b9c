"""Growth and LiGO's fit on real pretrained checkpoints (bench/real_checkpoints.py), with the engine's
defaults: held-out loss of the small model, of the grown model before fitting, and of the model as
written after each number of fitting steps, per strategy, with wall time and peak memory.

    python -m bench.real_fit [--checkpoints smollm2-135m,all-minilm-l6-v2] [--steps 4,25,100]
                             [--strategies preserve,stack,ligo] [--keep-layers 0] [--batch-size 2]
                             [--seq-len 64] [--heldout 8] [--data FILE] [--out docs/results/real_fit.json]

``--keep-layers N`` keeps the first N layers of the checkpoint (its embeddings, final norm and head
stay): for quick checks of the mechanics only, since a truncated model is no longer a good model
(SmolLM2 cut to 8 of its 30 layers scores 19.5 nats, worse than random). Targets are set per
checkpoint with ``--target NAME=FIELDS`` (default: ``TARGETS``). A bare encoder (no LM head) has
no held-out loss; for it the bench records growth time and memory, and that ``ligo`` is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

from bench import real_checkpoints
from ligo_core.checkpoint import load_checkpoint
from ligo_core.data import batches, build_token_data
from ligo_core.errors import LigoError
from ligo_core.growth import grow_model
from ligo_core.objective import heldout_loss, tokenizer_info
from ligo_core.targets import resolve_target, sizes_of

TARGETS = {  # the growth was 30L/576 -> 36L/768 (12 heads, 4 KV heads): too slow for this CPU
    "smollm2-135m": "layers=32",
    "all-minilm-l6-v2": "layers=12,hidden=768,heads=12,ffn=3072",
}


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 50 ms)."""

    def __enter__(self):
        self.peak, self._stop = psutil.Process().memory_info().rss, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        proc = psutil.Process()
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False


def truncated(model, keep: int | None):
    """The model's first ``keep`` layers, its embeddings, final norm and head unchanged."""
    if not keep:
        return model
    base = model.base_model
    layers = base.layers if hasattr(base, "layers") else base.encoder.layer
    del layers[keep:]
    model.config.num_hidden_layers = keep
    return model


def run_checkpoint(name: str, args, log=print) -> dict:
    directory = real_checkpoints.export(name, args.cache)
    loaded = load_checkpoint(directory)
    small = truncated(loaded.model, args.keep_layers if loaded.layout.has_head else None)
    target = resolve_target(args.targets.get(name, TARGETS[name]), small.config)
    result = {"checkpoint": name, "source": real_checkpoints.CHECKPOINTS[name].model,
              "small": sizes_of(small.config), "target": sizes_of(target), "rows": []}
    if not loaded.layout.has_head:
        info, data = None, None
    else:
        data = build_token_data(args.data, loaded.tokenizer, args.seq_len,
                                max_train_tokens=max(args.steps) * args.batch_size * args.seq_len * 2,
                                max_heldout_tokens=args.heldout * args.seq_len)
        info = tokenizer_info(loaded.tokenizer, small.config)
        result["small_loss"] = heldout_loss(small, data.heldout, loaded.layout.family.objective, info,
                                            embedding_name=loaded.layout.embedding_name)
        result["heldout_tokens"] = int(data.heldout.numel())
        log(f"[{name}] small {result['small']} held-out loss {result['small_loss']:.4f}")
    for strategy in args.strategies:
        for steps in (args.steps if strategy == "ligo" else [0]):
            row = {"strategy": strategy, "fit_steps": steps}
            started = time.perf_counter()
            try:
                with PeakRSS() as mem:
                    _, grown = grow_model(
                        small, target, strategy=strategy, fit_steps=steps, tokenizer=loaded.tokenizer,
                        train_batches=batches(data.train, args.batch_size, 0) if data is not None else None,
                        heldout=data.heldout if data is not None else None,
                    )
            except LigoError as exc:
                row["refused"] = str(exc)
                log(f"[{name}] {strategy}: refused: {exc}")
                result["rows"].append(row)
                continue
            losses = grown["heldout_loss"]
            row.update(seconds=round(time.perf_counter() - started, 1), peak_rss_gb=round(mem.peak / 2**30, 2),
                       spread=grown["spread"], before_fit=losses["before_fit"], fit_start=losses.get("fit_start"),
                       as_written=losses["after_fit"], fit_lr=grown.get("fit_lr"),
                       fit=grown.get("fit_guard"), fit_history=grown["fit_history"])
            result["rows"].append(row)
            log(f"[{name}] {strategy} {steps} steps: before {_f(row['before_fit'])} start {_f(row['fit_start'])} "
                f"written {_f(row['as_written'])} ({(row['fit'] or {}).get('outcome')}) {row['seconds']} s "
                f"{row['peak_rss_gb']} GB")
    return result


def _f(x):
    return "-" if x is None else f"{x:.4f}"


def markdown(results: list[dict], command: str) -> str:
    lines = [f"`{command}`", ""]
    for r in results:
        s, t = r["small"], r["target"]
        lines += [f"**{r['checkpoint']}**: {r['source']}; grown {s['layers']}L/{s['hidden']} -> "
                  f"{t['layers']}L/{t['hidden']} ({t['heads']} heads, {t['kv_heads']} KV, FFN {t['ffn']}); "
                  f"small model held-out loss {_f(r.get('small_loss'))}", "",
                  "| strategy | fit steps | before fit | fit start | as written | outcome | time (s) | peak RSS (GB) |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            if "refused" in row:
                lines.append(f"| {row['strategy']} | {row['fit_steps']} | refused: {row['refused'][:90]}... |"
                             " | | | | |")
                continue
            outcome = (row["fit"] or {}).get("outcome", "")
            lines.append(f"| {row['strategy']} | {row['fit_steps']} | {_f(row['before_fit'])} | {_f(row['fit_start'])} "
                         f"| {_f(row['as_written'])} | {outcome} | {row['seconds']} | {row['peak_rss_gb']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", default=",".join(TARGETS))
    parser.add_argument("--strategies", default="preserve,stack,ligo")
    parser.add_argument("--steps", default="4,25,100")
    parser.add_argument("--keep-layers", type=int, default=0, help="0: every layer")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--heldout", type=int, default=8, help="held-out sequences")
    parser.add_argument("--data", help="fitting and held-out text (default: the shipped corpus)")
    parser.add_argument("--target", action="append", default=[], help="NAME=FIELDS, e.g. smollm2-135m=layers=36")
    parser.add_argument("--cache", help="where the real checkpoints are exported (bench/real_checkpoints.py)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="docs/results/real_fit.json")
    args = parser.parse_args(argv)
    args.strategies = args.strategies.split(",")
    args.steps = [int(s) for s in args.steps.split(",")]
    args.targets = dict(t.split("=", 1) for t in args.target)
    torch.set_num_threads(args.threads)
    results = []
    for name in args.checkpoints.split(","):
        reason = real_checkpoints.missing_reason(name)
        if reason:
            print(f"[{name}] skipped: {reason}")
            continue
        results.append(run_checkpoint(name, args))
    command = "python -m bench.real_fit " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "results": results}, indent=1))
    out.with_suffix(".md").write_text(markdown(results, command))
    print(markdown(results, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
