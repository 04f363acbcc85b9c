"""What scoring a masked LM's head on the masked positions only saves per training step.

Interleaved A/B on one model and batch: the Hugging Face way (logits at every position, the
unmasked ones ignored by the loss) against ``ligo_core.objective.loss_terms`` (the head on the
masked 15% only). Same masks, same loss; prints milliseconds per AdamW step.

    python -m bench.mlm_head [--layers 4 --hidden 128 --vocab 4096 --batch 32 --seq-len 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM

from ligo_core.data import mask_tokens
from ligo_core.objective import loss_terms


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=6, help="A/B rounds (default 6)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round and variant (default 10)")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = BertConfig(vocab_size=args.vocab, max_position_embeddings=args.seq_len, num_hidden_layers=args.layers,
                        hidden_size=args.hidden, num_attention_heads=max(1, args.hidden // 32),
                        intermediate_size=4 * args.hidden, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertForMaskedLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(5, args.vocab, (args.batch, args.seq_len))
    info = {"mask_id": 4, "vocab_size": args.vocab, "special_ids": []}

    def every_position():
        inputs, labels = mask_tokens(ids, info, torch.Generator().manual_seed(0))
        logits = model(input_ids=inputs).logits
        return F.cross_entropy(logits.float().reshape(-1, args.vocab), labels.reshape(-1), ignore_index=-100)

    def masked_only():
        total, count = loss_terms(model, ids, "mlm", info, torch.Generator().manual_seed(0))
        return total / count

    def step(loss_fn):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()

    variants = {"head at every position": every_position, "head at masked positions (engine)": masked_only}
    torch.testing.assert_close(every_position(), masked_only(), rtol=1e-5, atol=1e-5)  # same loss
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            step(fn)  # warm
            started = time.perf_counter()
            for _ in range(args.steps):
                step(fn)
            times[name].append((time.perf_counter() - started) / args.steps * 1000)
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians["head at every position"]
    print(f"BERT {args.layers}L/{args.hidden}, vocab {args.vocab}, batch {args.batch} x {args.seq_len}, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds of {args.steps} steps")
    print("| loss | ms per step (median) | time saved |")
    print("|---|---:|---:|")
    for name, ms in medians.items():
        print(f"| {name} | {ms:.0f} | {1 - ms / base:.0%} |")
    return medians


if __name__ == "__main__":
    main()
