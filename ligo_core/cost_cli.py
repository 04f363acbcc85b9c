"""``ligo estimate``: the cost of growing versus training the target from scratch.

``ligo_core/cli.py`` calls ``add_parser(subparsers)``; the handler is stored as the subparser's
``func`` default and returns the exit status. The fitting batch and length default to what
``ligo grow`` fits with (``ligo_core.catalog``), so the fit cost shown is the one grow runs.
"""

from __future__ import annotations

import argparse
import json
import sys

from ligo_core.catalog import DEFAULT_BATCH_SIZE, DEFAULT_FIT_STEPS, DEFAULT_SEQ_LEN
from ligo_core.cost import ACCELERATORS, CONVENTIONS, estimate
from ligo_core.errors import LigoError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "estimate",
        help="FLOPs, GPU-hours and money of growing versus training from scratch",
        description="Estimate the cost of training TARGET from scratch and of growing it from SOURCE, "
                    "with the expected savings and where each number comes from. TARGET and SOURCE "
                    "take the same forms as in `ligo grow`: a preset, a config.json path, or fields.",
        epilog="example:\n  ligo estimate --source gpt2 --target gpt2-medium --gpu A100 --tokens 20000000000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--source", required=True,
                   help="small model: preset, config.json path, or fields with family= "
                        "(e.g. bert-small, or family=gpt2,layers=6,hidden=512,heads=8)")
    p.add_argument("--target", required=True,
                   help="large model: preset, config.json path, or fields; fields left out keep the source's "
                        "proportions (e.g. bert-base, or layers=12,hidden=768)")
    p.add_argument("--strategy", default="ligo", help="growth strategy (default: ligo; e.g. stack)")
    p.add_argument("--fit-steps", type=int, default=DEFAULT_FIT_STEPS,
                   help=f"operator fitting steps (default: {DEFAULT_FIT_STEPS}; e.g. 20)")
    p.add_argument("--fit-batch", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"fitting batch size in sequences (default: {DEFAULT_BATCH_SIZE}, what `ligo grow` fits "
                        "with; e.g. 256, the LiGO paper's)")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                   help=f"sequence length of fitting and training (default: {DEFAULT_SEQ_LEN}; e.g. 512)")
    p.add_argument("--tokens", type=int, default=None,
                   help="planned training tokens of the large model (default: 20 per parameter; e.g. 3000000000)")
    p.add_argument("--gpu", default="H100", help=f"accelerator: {', '.join(ACCELERATORS)} (default: H100; e.g. A100)")
    p.add_argument("--price", type=float, default=None,
                   help="USD per GPU-hour (default: the table's list price; e.g. 2.5)")
    p.add_argument("--utilisation", type=float, default=None,
                   help="model FLOPs utilisation, 0-1 (default: 0.4; e.g. 0.35)")
    p.add_argument("--convention", choices=sorted(CONVENTIONS), default="standard",
                   help="FLOPs counting: standard, the LiGO paper's, or engine (a masked LM's head on masked "
                        "tokens only; default: standard; e.g. paper)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON instead of a table")
    p.set_defaults(func=run_estimate)
    return p


def run_estimate(args: argparse.Namespace) -> int:
    from ligo_core.targets import resolve_target

    try:
        source = resolve_target(args.source)
        target = resolve_target(args.target, source)
        result = estimate(
            source, target, strategy=args.strategy, fit_steps=args.fit_steps, fit_batch=args.fit_batch,
            seq_len=args.seq_len, tokens=args.tokens, gpu=args.gpu, price_per_gpu_hour=args.price,
            utilisation=args.utilisation, convention=args.convention,
        )
    except LigoError as exc:
        print(f"ligo: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


def print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from ligo_core.targets import describe_sizes

    a, s = r["assumptions"], r["savings"]
    table = Table(title=f"{r['family']}: {_size(r['source'])} -> {_size(r['target'])}, strategy {r['strategy']}")
    for col in ("phase", "FLOPs", "GPU-hours", "cost (USD)"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    fit = r["fit"]
    fit_label = f"fit ({fit['steps']} steps x {fit['batch']} x {fit['seq_len']})" if fit["steps"] else "materialise"
    rows = [
        ("from scratch", r["scratch"]),
        (fit_label, r["fit"]),
        ("grown: fit + training", r["grown"]),
        ("saved", s),
    ]
    for name, phase in rows:
        table.add_row(name, f"{phase['flops']:.3g}", _num(phase["gpu_hours"]), _num(phase["cost_usd"]))
    console = Console()
    console.print(f"target: {describe_sizes(r['target'])}", soft_wrap=True)
    console.print(table)
    console.print(f"savings {s['fraction']:.1%} (range {s['low']:.1%} to {s['high']:.1%})")
    console.print(f"basis: {s['basis']}", soft_wrap=True)
    console.print(
        f"assumptions: {a['gpu']} at {a['peak_tflops']:g} TFLOP/s peak x {a['utilisation']:g} utilisation, "
        f"${a['price_per_gpu_hour']:g}/GPU-hour ({a['price_source']}); {a['tokens']:.3g} tokens "
        f"({a['tokens_source']}); {a['convention']['name']} FLOPs convention",
        soft_wrap=True,
    )


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _size(part: dict) -> str:
    return f"{part['layers']}L/{part['hidden']} ({part['parameters'] / 1e6:,.0f}M)"
