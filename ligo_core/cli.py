"""The ``ligo`` command: grow, inspect, estimate, demo, and (with the service extra) serve and keys."""

from __future__ import annotations

import argparse
import json
import sys

from ligo_core.allocator import keep_freed_memory
from ligo_core.errors import GrowthCancelled, LigoError


def _progress_printer(console):
    """A rich progress bar for the fitting loop, and one line per stage."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    state = {"bar": None, "task": None, "stage": None}

    def on_event(event: dict) -> None:
        stage = event["stage"]
        if stage == "fitting":
            if state["bar"] is None:
                bar = Progress(TextColumn("fitting"), BarColumn(), MofNCompleteColumn(),
                               TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), console=console)
                bar.start()
                state["bar"], state["task"] = bar, bar.add_task("fit", total=event["total"], loss=float("nan"))
            state["bar"].update(state["task"], completed=event["step"], loss=event["loss"])
            return
        if state["bar"] is not None:
            state["bar"].stop()
            state["bar"] = None
        if stage != state["stage"] and console.is_terminal:
            console.print(f"[dim]{stage}...[/dim]")
            state["stage"] = stage

    return on_event


def _fmt_loss(x):
    return "-" if x is None else f"{x:.4f}"


def print_report(report: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"grown with {report['strategy']}", show_header=True)
    t.add_column("")
    t.add_column("source")
    t.add_column("grown")
    s, g = report["source"]["sizes"], report["target"]["sizes"]
    for key in ("layers", "hidden", "heads", "kv_heads", "ffn", "head_dim"):
        t.add_row(key, str(s[key]), str(g[key]))
    t.add_row("parameters", f"{report['source']['parameters']:,}", f"{report['target']['parameters']:,}")
    console.print(t)
    h = report["heldout_loss"]
    lt = Table(title="held-out loss", show_header=True)
    for col in ("small model", "grown, before fit", "grown, as written", "random large"):
        lt.add_column(col)
    lt.add_row(_fmt_loss(h["small"]), _fmt_loss(h["grown_before_fit"]), _fmt_loss(h["grown_after_fit"]),
               _fmt_loss(h["random_large"]))
    console.print(lt)
    fit = report["fit"]
    flops = fit.get("flops")
    console.print(
        f"operator parameters {report['operator_parameters']:,}; fit steps {fit['steps']} in {fit['seconds']:.1f}s"
        + (f", {flops:.3g} FLOPs" if flops else "")
        + (f"; max logit gap to the small model {report['function_gap_max_logit']:.2e}"
           if report.get("function_gap_max_logit") is not None else "")
    )
    outcome = fit.get("outcome")
    if outcome:
        from ligo_core.fit_guard import OUTCOMES

        console.print(f"fit outcome: {outcome} ({OUTCOMES.get(outcome, '')})"
                      + "".join(f"; {fit[k]}" for k in ("stop_reason", "final_check") if fit.get(k)))



def _own_directory(src: str) -> bool:
    """A directory named on the command line is the user's own: its files may link elsewhere
    (Hugging Face cache snapshots link to a blob store). Archives are always confined."""
    from pathlib import Path

    return Path(src).is_dir()


def cmd_grow(args) -> int:
    from rich.console import Console

    import ligo_core

    keep_freed_memory()  # a one-off process: fewer page faults in CPU fitting (ligo_core/allocator.py)
    console = Console(stderr=True)
    report = ligo_core.grow(
        args.src, args.target, args.out, strategy=args.strategy, fit_steps=args.fit_steps, data=args.data,
        seed=args.seed, device=args.device, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
        progress=_progress_printer(console), max_shard_size=args.max_shard_size, ligo_init=args.ligo_init,
        accumulate=args.accumulate, follow_links=_own_directory(args.src),
        **{k: v for k, v in {"noise": args.noise, "spread": args.spread}.items() if v is not None},
    )
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_report(report, Console())
        print(f"wrote {args.out}")
    return 0


def cmd_inspect(args) -> int:
    import ligo_core

    info = ligo_core.inspect_checkpoint(args.src, follow_links=_own_directory(args.src))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    sizes = ligo_core.sizes_of(ligo_core.resolve_target(info["config"]))
    t = Table(title=str(args.src), show_header=False)
    for key, value in (("family", info["family"]), ("model_type", info["model_type"]),
                       ("class", info["architectures"][0]), ("parameters", f"{info['num_parameters']:,}"),
                       ("format", info["format"]), ("dtype", info["dtype"]), ("tokenizer", info["has_tokenizer"]),
                       *sizes.items()):
        t.add_row(key, str(value))
    Console().print(t)
    return 0


def build_parser() -> argparse.ArgumentParser:
    import ligo_core

    parser = argparse.ArgumentParser(prog="ligo", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ligo {ligo_core.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("grow", help="grow a checkpoint to a larger architecture")
    g.add_argument("src", help="HF model directory, or a .tar / .tar.gz / .zip of one")
    g.add_argument("--target", required=True,
                   help="preset name, path to a config.json, or fields like layers=12,hidden=768,heads=12,ffn=3072")
    g.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    g.add_argument("--strategy", default="ligo", choices=ligo_core.STRATEGIES)
    g.add_argument("--fit-steps", type=int, default=100, help="operator fitting steps for 'ligo' (default 100)")
    g.add_argument("--ligo-init", default="preserve", choices=("preserve", "stack", "interpolate"),
                   help="where LiGO's depth mixing starts: zero-output new blocks (default), stacked copies "
                        "(the reference code's), or each layer repeated (widths always start function-preserving)")
    g.add_argument("--noise", type=float,
                   help="symmetry breaking between copied units, 0-1 (default 1; exact at any value)")
    g.add_argument("--spread", type=float,
                   help="move copied units' incoming weights apart, 0-4 (default 0 for 'preserve', which keeps "
                        "the function exactly, 2 for the others; exact to first order)")
    g.add_argument("--data", help="text file (paragraphs between blank lines, or one per line), JSON lines "
                                  "with a 'text' field, or a directory of them (default: the shipped English corpus)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--lr", type=float, help="peak fitting learning rate (default 1e-4)")
    g.add_argument("--batch-size", type=int, help="fitting batch size (default 16)")
    g.add_argument("--seq-len", type=int, help="fitting sequence length (default 128)")
    g.add_argument("--accumulate", type=int, default=1,
                   help="batches per fitting step: the operator runs once per step, the batches' "
                        "gradients add up (bigger fitting batches at one batch's memory; default 1)")
    g.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    g.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB)")
    g.add_argument("--json", action="store_true", help="print the growth report as JSON")
    g.set_defaults(func=cmd_grow)

    i = sub.add_parser("inspect", help="show a checkpoint's family, config and parameter count")
    i.add_argument("src")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    for module in ("ligo_core.cost_cli", "ligo_core.demo"):
        _register(sub, module)
    for module in ("app.cli",):  # the service, present with the [service] extra
        _register(sub, module)
    return parser


def _register(sub, module: str) -> None:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError:
        return
    mod.add_parser(sub)


def _positive(args) -> None:
    for name in ("fit_steps", "batch_size", "seq_len", "accumulate"):
        value = getattr(args, name, None)
        if value is not None and value < (0 if name == "fit_steps" else 1):
            raise LigoError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'fit_steps' else 'positive'}, got {value}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _positive(args)
        return args.func(args) or 0
    except LigoError as exc:
        print(f"ligo: error: {exc}", file=sys.stderr)
        return 2
    except GrowthCancelled:
        print("ligo: cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("ligo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
