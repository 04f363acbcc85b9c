"""``ligo demo``: the whole job on one machine with nothing downloaded.

Trains a byte-level BPE tokenizer on the shipped English corpus, pretrains a tiny GPT-2 for a
minute, saves it as a Hugging Face checkpoint, grows it with LiGO, and prints the report.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

DEMO_SMALL = dict(n_layer=2, n_embd=128, n_head=4, n_positions=128)
DEMO_TARGET = "layers=4,hidden=256,heads=8,ffn=1024"
VOCAB = 2048
SEQ_LEN = 64


def pretrain_small(directory: Path, steps: int, seed: int, console) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from ligo_core.data import batches, default_corpus_texts, pack_tokens, split_texts
    from ligo_core.tokenizer import train_tokenizer
    from ligo_core.training import train

    train_texts, _ = split_texts(default_corpus_texts())
    tokenizer = train_tokenizer(train_texts, vocab_size=VOCAB, style="gpt2")
    tokens = pack_tokens(train_texts, tokenizer, SEQ_LEN, max_tokens=steps * 16 * SEQ_LEN)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), **DEMO_SMALL,
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    started = time.perf_counter()
    history = train(model, batches(tokens, 16, seed), steps, lr=3e-3, warmup=steps // 10, objective="clm",
                    seed=seed, device="cpu" if not torch.cuda.is_available() else None)
    console.print(f"pretrained a {sum(p.numel() for p in model.parameters()):,}-parameter GPT-2 for {steps} steps "
                  f"in {time.perf_counter() - started:.0f}s (train loss {history['train_loss'][-1]:.3f})")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def cmd_demo(args) -> int:
    from rich.console import Console

    import ligo_core
    from ligo_core.allocator import keep_freed_memory
    from ligo_core.cli import _progress_printer, print_report

    keep_freed_memory()  # a one-off process: fewer page faults in CPU training (ligo_core/allocator.py)
    console = Console(stderr=True)
    work = Path(args.workdir)
    small, grown = work / "small", work / "grown"
    if grown.exists():
        shutil.rmtree(grown)
    if not (small / "config.json").is_file():
        pretrain_small(small, args.pretrain_steps, args.seed, console)
    report = ligo_core.grow(small, args.target, grown, strategy=args.strategy, fit_steps=args.fit_steps,
                            seed=args.seed, batch_size=8, seq_len=SEQ_LEN, progress=_progress_printer(console))
    print_report(report, Console())
    print(f"small checkpoint: {small}\ngrown checkpoint: {grown} (growth_report.json inside)")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="pretrain a tiny GPT-2 on the shipped corpus and grow it (no downloads)")
    p.add_argument("--workdir", default="ligo-demo", help="where the small and grown checkpoints go (default ligo-demo)")
    p.add_argument("--pretrain-steps", type=int, default=250)
    p.add_argument("--target", default=DEMO_TARGET)
    p.add_argument("--strategy", default="ligo")
    p.add_argument("--fit-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
