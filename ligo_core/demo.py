"""``ligo demo``: the whole job on one machine with nothing downloaded.

Trains a byte-level BPE tokenizer on the shipped English corpus, pretrains a tiny GPT-2, saves
it as a Hugging Face checkpoint, grows it with LiGO, and prints the report. Every stage prints a
line with the time since the start (README.md says how long each takes on 2 CPU cores).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from ligo_core import catalog

DEMO_SMALL = dict(n_layer=2, n_embd=128, n_head=4, n_positions=128)
DEMO_TARGET = "layers=4,hidden=256,heads=8,ffn=1024"
VOCAB = 2048
SEQ_LEN = 64


def pretrain_small(directory: Path, steps: int, seed: int, progress) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from ligo_core.data import batches, default_corpus_texts, pack_tokens, split_texts
    from ligo_core.tokenizer import train_tokenizer
    from ligo_core.training import train

    train_texts, _ = split_texts(default_corpus_texts())
    progress.begin("tokenizer", f"vocabulary {VOCAB}")
    tokenizer = train_tokenizer(train_texts, vocab_size=VOCAB, style="gpt2")
    tokens = pack_tokens(train_texts, tokenizer, SEQ_LEN, max_tokens=steps * 16 * SEQ_LEN)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), **DEMO_SMALL,
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    started = time.perf_counter()
    history = train(model, batches(tokens, 16, seed), steps, lr=3e-3, warmup=steps // 10, objective="clm",
                    seed=seed, device="cpu" if not torch.cuda.is_available() else None, progress=progress)
    progress.close()
    progress.line(f"pretrained a {sum(p.numel() for p in model.parameters()):,}-parameter GPT-2 for {steps} steps "
                  f"in {time.perf_counter() - started:.0f}s (train loss {history['train_loss'][-1]:.3f})")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def cmd_demo(args) -> int:
    from rich.console import Console

    import ligo_core
    from ligo_core.allocator import keep_freed_memory
    from ligo_core.cli import ProgressPrinter, print_report

    keep_freed_memory()  # a one-off process: fewer page faults in CPU training (ligo_core/allocator.py)
    progress = ProgressPrinter(Console(stderr=True))
    work = Path(args.workdir)
    small, grown = work / "small", work / "grown"
    if grown.exists():
        shutil.rmtree(grown)
    try:
        if (small / "config.json").is_file():
            progress.line(f"reusing the small model in {small} (delete it to pretrain again)")
        else:
            pretrain_small(small, args.pretrain_steps, args.seed, progress)
        report = ligo_core.grow(small, args.target, grown, strategy=args.strategy, fit_steps=args.fit_steps,
                                seed=args.seed, batch_size=8, seq_len=SEQ_LEN, progress=progress)
    finally:
        progress.close()
    progress.line("done")
    print_report(report, Console())
    print(f"small checkpoint: {small}\ngrown checkpoint: {grown} (growth_report.json inside)")
    return 0


def add_parser(subparsers) -> None:
    import argparse

    p = subparsers.add_parser("demo", help="pretrain a tiny GPT-2 on the shipped corpus and grow it (no downloads)",
                              description=__doc__.split("\n\n")[1].replace("``", "`"),
                              epilog="example:\n  ligo demo --workdir /tmp/ligo-demo --fit-steps 20",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="ligo-demo",
                   help="where the small and grown checkpoints go; a small model already there is reused "
                        "(default ligo-demo; e.g. /tmp/ligo-demo)")
    p.add_argument("--pretrain-steps", type=int, default=250,
                   help="pretraining steps of the small GPT-2 (default 250; e.g. 100 for a quicker, weaker model)")
    p.add_argument("--target", default=DEMO_TARGET,
                   help=f"the grown size, as in `ligo grow` (default {DEMO_TARGET}; e.g. layers=4,hidden=128)")
    p.add_argument("--strategy", default=catalog.DEFAULT_STRATEGY, choices=catalog.STRATEGY_NAMES, metavar="NAME",
                   help=f"growth strategy, as in `ligo grow`: {', '.join(catalog.STRATEGY_NAMES)} "
                        f"(default {catalog.DEFAULT_STRATEGY}; e.g. preserve)")
    p.add_argument("--fit-steps", type=int, default=catalog.DEFAULT_FIT_STEPS,
                   help=f"operator fitting steps (default {catalog.DEFAULT_FIT_STEPS}; e.g. 20)")
    p.add_argument("--seed", type=int, default=catalog.DEFAULT_SEED,
                   help="random seed of pretraining and fitting (default 0; e.g. 1)")
    p.set_defaults(func=cmd_demo)
