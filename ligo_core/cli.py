"""The `ligo` command: grow, inspect, estimate, demo, and (with the service extra) serve and keys."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ligo_core.allocator import keep_freed_memory
from ligo_core.errors import GrowthCancelled, LigoError
from ligo_core.targets import describe_sizes

# What each stage of a run is, in the words a log reader needs.
STAGE_LABELS = {
    "loading": "loading the checkpoint and the fitting text",
    "evaluating": "held-out loss of the small and grown models",
    "fitting": "fitting the growth operator",
    "materialising": "writing the grown weights",
    "saving": "saving the grown checkpoint",
    "tokenizer": "training a byte-level BPE tokenizer on the shipped corpus",
    "train": "pretraining the small model",
}
LOG_LINES_PER_STAGE = 10  # step lines of a long stage in a log file (every 10%)


class ProgressPrinter:
    """Progress of a run on stderr: one line per stage with the time since the start, then a bar
    for a stage with steps on a terminal, or a line every tenth of it in a log file (no bars)."""

    def __init__(self, console):
        self.console, self.started = console, time.perf_counter()
        self.stage: str | None = None
        self.bar = self.task = None
        if not console.is_terminal:  # the libraries' own bars too (transformers' "Writing model shards")
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()

    def line(self, text: str) -> None:
        self.console.print(f"[{time.perf_counter() - self.started:7.1f}s] {text}", markup=False, highlight=False,
                           soft_wrap=True)

    def begin(self, stage: str, detail: str = "") -> None:
        """A new stage (also for work that sends no events, like training the tokenizer)."""
        self.close()
        self.stage = stage
        self.line(STAGE_LABELS.get(stage, stage) + (f" ({detail})" if detail else ""))

    def __call__(self, event: dict) -> None:
        stage, step, total, loss = event["stage"], event.get("step", 0), event.get("total", 1), event.get("loss")
        if stage == "eval":  # held-out checks inside training: part of its stage
            return
        if stage != self.stage:
            self.begin(stage, f"{total} steps" if total > 1 else "")
        if "target" in event:
            self.line("target: " + describe_sizes(event["target"]))
        if total <= 1 or step <= 0:
            return
        if self.console.is_terminal:
            self._bar(stage, step, total, loss)
        elif step == total or step * LOG_LINES_PER_STAGE // total != (step - 1) * LOG_LINES_PER_STAGE // total:
            self.line(f"{stage} {step}/{total}" + ("" if loss is None else f", loss {loss:.4f}"))

    def _bar(self, stage: str, step: int, total: int, loss) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if self.bar is None:
            self.bar = Progress(TextColumn(stage), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), console=self.console)
            self.bar.start()
            self.task = self.bar.add_task(stage, total=total, loss=float("nan"))
        self.bar.update(self.task, completed=step, loss=float("nan") if loss is None else loss)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


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

    # A one-off process: fewer page faults (ligo_core/allocator.py). CPU fitting steps reuse their
    # buffers, and a streamed grow reuses its blocks and output buffers, so the heap stays at its
    # peak without growing (1B -> 8B: 2.5 GiB either way, 24 s against 38 s without).
    keep_freed_memory()
    progress = ProgressPrinter(Console(stderr=True))
    options = dict(
        strategy=args.strategy, fit_steps=args.fit_steps, data=args.data, seed=args.seed, device=args.device,
        lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len, max_shard_size=args.max_shard_size,
        ligo_init=args.ligo_init, accumulate=args.accumulate, follow_links=_own_directory(args.src),
        eval_tokens=args.eval_tokens, dtype=args.dtype, memory_gb=args.memory_gb,
        **{k: v for k, v in {"noise": args.noise, "spread": args.spread}.items() if v is not None},
    )
    try:
        if args.nproc > 1:  # data-parallel fitting in that many processes (ligo_core/parallel.py)
            report = ligo_core.grow_parallel(args.src, args.target, args.out, nproc=args.nproc, progress=progress,
                                             **options)
        else:
            report = ligo_core.grow(args.src, args.target, args.out, progress=progress, **options)
    finally:
        progress.close()
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


DESCRIPTION = """Grow a small pretrained transformer checkpoint into a larger one with a learned linear
growth operator (LiGO) or a fixed baseline; estimate what growing saves; try it all with
`ligo demo`; with the service extra, run the growth service (`ligo serve`, `ligo keys`)."""

EXAMPLES = """examples:
  ligo demo
  ligo grow ./gpt2-small --target gpt2-medium --out ./grown
  ligo estimate --source bert-small --target bert-base
  ligo COMMAND --help    (every option, with an example)"""


def example(command: str) -> str:
    return f"example:\n  {command}"


def build_parser() -> argparse.ArgumentParser:
    import ligo_core
    from ligo_core import catalog

    parser = argparse.ArgumentParser(prog="ligo", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ligo {ligo_core.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    g = sub.add_parser("grow", help="grow a checkpoint to a larger architecture", formatter_class=raw,
                       description="Grow SRC into TARGET and write a Hugging Face checkpoint with growth_report.json.",
                       epilog=example("ligo grow ./small --target layers=4,hidden=256,heads=8 --out ./grown "
                                      "--fit-steps 100"))
    g.add_argument("src", help="HF model directory, or a .tar / .tar.gz / .zip of one (e.g. ./gpt2-small)")
    g.add_argument("--target", required=True,
                   help="preset name, path to a config.json, or fields; fields left out keep the source's "
                        "proportions (e.g. gpt2-medium, or layers=12,hidden=768,heads=12,ffn=3072)")
    g.add_argument("--out", required=True, help="output directory, which must not exist or be empty (e.g. ./grown)")
    g.add_argument("--strategy", default=catalog.DEFAULT_STRATEGY, choices=catalog.STRATEGY_NAMES, metavar="NAME",
                   help=f"how to grow: {', '.join(catalog.STRATEGY_NAMES)} (default {catalog.DEFAULT_STRATEGY}: a "
                        "fitted LiGO operator; the others are fixed; e.g. --strategy preserve)")
    g.add_argument("--fit-steps", type=int, default=catalog.DEFAULT_FIT_STEPS,
                   help="operator fitting steps for 'ligo'; 0 keeps the starting operator "
                        f"(default {catalog.DEFAULT_FIT_STEPS}; e.g. 20)")
    g.add_argument("--ligo-init", default=catalog.DEFAULT_LIGO_INIT, choices=tuple(catalog.LIGO_INITS),
                   help="where LiGO's depth mixing starts: "
                        + "; ".join(f"{name}: {what}" for name, what in catalog.LIGO_INITS.items())
                        + f" (default {catalog.DEFAULT_LIGO_INIT}; widths always start function-preserving; "
                          "e.g. --ligo-init stack)")
    g.add_argument("--noise", type=float,
                   help=f"symmetry breaking between copied units, {catalog.NOISE.low:g}-{catalog.NOISE.high:g} "
                        f"(default {catalog.DEFAULT_NOISE:g}; exact at any value; e.g. 0.5)")
    g.add_argument("--spread", type=float,
                   help=f"move copied units' incoming weights apart, {catalog.SPREAD.low:g}-{catalog.SPREAD.high:g} "
                        f"(default {catalog.spread_defaults_text()}; 0 keeps the function exactly; exact to first order; e.g. 2)")
    g.add_argument("--data", help="fitting text: a text file (paragraphs between blank lines, or one per line), "
                                  "JSON lines with a 'text' field, or a directory of them (default: the shipped "
                                  "English corpus; e.g. ./corpus.jsonl)")
    g.add_argument("--seed", type=int, default=catalog.DEFAULT_SEED,
                   help="random seed of the fitting batches and the symmetry breaking (default 0; e.g. 1)")
    g.add_argument("--lr", type=float, help=f"peak fitting learning rate (default {catalog.DEFAULT_FIT_LR:g}; e.g. 3e-4)")
    g.add_argument("--batch-size", type=int,
                   help=f"fitting batch size in sequences (default {catalog.DEFAULT_BATCH_SIZE}; e.g. 32)")
    g.add_argument("--seq-len", type=int,
                   help=f"fitting sequence length in tokens (default {catalog.DEFAULT_SEQ_LEN}, at most the model's "
                        "positions; e.g. 256)")
    g.add_argument("--accumulate", type=int, default=1,
                   help="batches per fitting step: the operator runs once per step, the batches' "
                        "gradients add up (bigger fitting batches at one batch's memory; default 1; e.g. 4)")
    g.add_argument("--nproc", type=int, default=1,
                   help="processes that fit LiGO together, data-parallel under torch.distributed: one per GPU "
                        "(NCCL), or CPU processes (gloo) that split each batch (default 1; e.g. 4)")
    g.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ... (e.g. cpu)")
    g.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB; e.g. 500MB)")
    g.add_argument("--dtype", default="auto", choices=catalog.OUTPUT_DTYPES,
                   help="dtype of the written weights (default auto: the source's, so bf16 stays bf16; "
                        "e.g. float32)")
    g.add_argument("--eval-tokens", type=int,
                   help="held-out tokens to score the small, grown and random models on (default 64 sequences "
                        "of the sequence length; 0 skips scoring, and then a fixed strategy builds no model "
                        "and writes tensor by tensor: use 0 for big sizes; e.g. 0)")
    g.add_argument("--memory-gb", type=float,
                   help="memory budget in GiB the job's plan must fit, checked before any work (default "
                        "LIGO_WORKER_MEMORY_GB, else the CUDA device's memory, else the available RAM; e.g. 6)")
    g.add_argument("--json", action="store_true", help="print the growth report as JSON instead of tables")
    g.set_defaults(func=cmd_grow)

    i = sub.add_parser("inspect", help="show a checkpoint's family, config and parameter count", formatter_class=raw,
                       epilog=example("ligo inspect ./grown --json"))
    i.add_argument("src", help="HF model directory, or a .tar / .tar.gz / .zip of one (e.g. ./grown)")
    i.add_argument("--json", action="store_true", help="print everything, the full config included, as JSON")
    i.set_defaults(func=cmd_inspect)

    for module in ("ligo_core.cost_cli", "ligo_core.demo", "ligo_client.cli"):
        _register(sub, module)
    _register(sub, "app.cli", ("serve", "keys"))  # the service, which needs the [service] extra
    return parser


SERVICE_EXTRA = "pip install 'ligo-grow[service]'"


def service_extra_missing(command: str, missing: str) -> LigoError:
    return LigoError(f"`ligo {command}` needs the service extra ({missing} not installed); "
                     f"install it with: {SERVICE_EXTRA}")


def _register(sub, module: str, commands: tuple[str, ...] = ()) -> None:
    """Add a module's subcommands; if it cannot be imported, ``commands`` still appear and say why."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        missing = exc.name or module
        for name in commands:
            p = sub.add_parser(name, help=f"needs the service extra: {SERVICE_EXTRA}", add_help=False)
            p.set_defaults(func=lambda args, name=name: _raise(service_extra_missing(name, missing)),
                           any_arguments=True)
        return
    mod.add_parser(sub)


def _raise(exc: Exception):
    raise exc


def _positive(args) -> None:
    for name in ("fit_steps", "batch_size", "seq_len", "accumulate", "nproc"):
        value = getattr(args, name, None)
        if value is not None and value < (0 if name == "fit_steps" else 1):
            raise LigoError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'fit_steps' else 'positive'}, got {value}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "any_arguments", False):  # a stand-in command takes anything
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
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
