"""Does growing save compute?  The LiGO paper's Table 1 at small scale.

For each model family (GPT-2, causal LM; BERT, masked LM):

1. train a byte-level BPE tokenizer on the train split of the shipped corpus;
2. pretrain a small model for a fixed budget (not counted in any saving);
3. for every seed and strategy, build the large model (``scratch`` = random init, or
   ``ligo_core.grow_model`` with ``stack``, ``interpolate``, ``net2net``, ``preserve``,
   ``ligo``, and on request ``ligo-stack``) and train it with the identical recipe (optimizer, schedule, batch, sequence
   length, steps, data order, seed), logging held-out loss at regular intervals;
4. savings = 1 - (FLOPs to reach the scratch run's final held-out loss, growth/fitting
   included) / (FLOPs of the scratch run), crossing points interpolated linearly between
   eval points; the same for wall time.

    python bench/savings.py [--models gpt2,bert] [--seeds 0,1] [--size default|tiny|gpu]

Writes ``savings.md``, ``savings.json`` (one record per run), ``savings_curves.json`` and
``savings_loss_curves.png`` under ``--out`` (default ``docs/results``). The reference run (the
default ``--out``) also writes its records to ``ligo_core/data/calibration.json`` when it
completes: the measured calibration that ``ligo estimate`` ships with (``--calibration``).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ligo_core  # noqa: E402
from ligo_core import calibration, cost  # noqa: E402
from ligo_core.allocator import keep_freed_memory  # noqa: E402
from ligo_core.data import batches, default_corpus_texts, pack_tokens, split_texts  # noqa: E402
from ligo_core.tokenizer import tokenizer_info, train_tokenizer  # noqa: E402
from ligo_core.training import default_device, evaluate_loss, train  # noqa: E402

MODELS = ("gpt2", "bert")
STRATEGIES = ("scratch", "stack", "interpolate", "net2net", "preserve", "ligo", "ligo-stack")
DEFAULT_STRATEGIES = STRATEGIES[:-1]
# The fitted operator's start (ligo_init): ``ligo`` is the engine's default, the exact
# function-preserving operator; ``ligo-stack`` starts its depth mixing from stacked layers.
# (Runs recorded before 2026-11-29 02:49 UTC called these ``ligo-preserve`` and ``ligo``.)
LIGO_VARIANTS = {"ligo": "preserve", "ligo-stack": "stack"}


@dataclass(frozen=True)
class Size:
    """One benchmark scale: model shapes, data, and the shared training recipe."""

    small: tuple[int, int, int, int]  # layers, hidden, heads, ffn
    large: tuple[int, int, int, int]
    vocab: int
    seq_len: int
    batch: int
    small_steps: int  # pretraining budget of the small model
    steps: int  # every large run
    fit_steps: int  # LiGO operator fitting
    eval_every: int
    eval_seqs: int  # held-out sequences scored at each eval
    lr: float
    small_lr: float
    warmup_frac: float = 0.05
    weight_decay: float = 0.01
    corpus_docs: int | None = None  # use only the first documents of the corpus (CI)
    fit_batch: int | None = None  # sequences per LiGO fitting step, if not ``batch``
    noise: float | None = None  # growth's symmetry breaking, if not the engine's default
    fit_lr: float | None = None  # LiGO fitting's peak learning rate, if not the engine's default
    spread: float | None = None  # how far growth moves copied units apart, if not the engine's default
    bert: dict = field(default_factory=dict)  # BERT's own values of the fields above, where they differ

    def fit_batch_size(self) -> int:
        return self.fit_batch or self.batch

    def warmup(self, steps: int) -> int:
        return max(1, int(self.warmup_frac * steps))

    def for_model(self, model: str) -> Size:
        """The recipe of one model family: the shared fields with that family's own on top."""
        return replace(self, **(self.bert if model == "bert" else {}), bert={})


SIZES = {
    # CI: seconds. Checks the bookkeeping, not the science.
    "tiny": Size(small=(1, 32, 2, 64), large=(2, 64, 4, 128), vocab=512, seq_len=32, batch=8,
                 small_steps=20, steps=8, fit_steps=2, eval_every=4, eval_seqs=16, lr=3e-3, small_lr=3e-3,
                 corpus_docs=800),
    # 2 CPU cores: under an hour for both models and two seeds. GPT-2's small model gets as many
    # steps as every large run: well trained for its size, yet the large scratch run still ends
    # clearly below it (measured: small 5.55 vs scratch 5.23 nats). BERT's masked loss falls
    # slowly: its scratch run needs 1,000 steps, and its small model 200, to end 0.3 nats apart
    # (measured: 6.78 vs 6.42; at 600 and 600, 6.53 vs 6.55). Its post-LN stack learns faster at a
    # lower peak rate (400-step probe: 6.71 at 5e-4, 6.84 at 4e-3). GPT-2's operator is fitted on
    # 8 sequences a step (a quarter of the fit's cost, nearly the same start; measured: 3 points of savings
    # more); BERT's on the full batch (8 sequences hold ~75 masked tokens: the fit got worse).
    "default": Size(small=(2, 64, 2, 256), large=(4, 128, 4, 512), vocab=4096, seq_len=64, batch=32,
                    small_steps=600, steps=600, fit_steps=24, eval_every=25, eval_seqs=128,
                    lr=2e-3, small_lr=3e-3, fit_batch=8,
                    bert={"lr": 7e-4, "small_steps": 200, "steps": 1000, "fit_batch": None}),
    # One GPU: BERT-Small -> BERT-Base shapes at half width.
    "gpu": Size(small=(6, 256, 4, 1024), large=(12, 512, 8, 2048), vocab=8192, seq_len=128, batch=128,
                small_steps=8000, steps=4000, fit_steps=100, eval_every=100, eval_seqs=512,
                lr=6e-4, small_lr=1e-3),
}


# ----------------------------------------------------------------------------- FLOPs


FLOPS_CONVENTION = "engine"  # what ligo_core computes: a masked LM's head on the masked tokens only


def forward_flops_per_token(config, seq_len: int) -> float:
    """Forward FLOPs per token (matmuls and attention scores; the LM head on every position of a
    causal LM, on the masked 15% of a masked LM's)."""
    return cost.forward_flops_per_token(config, seq_len, convention=FLOPS_CONVENTION)


def train_flops_per_token(config, seq_len: int) -> float:
    """Forward + backward (backward = 2 x forward)."""
    return 3.0 * forward_flops_per_token(config, seq_len)


# ----------------------------------------------------------------------------- savings arithmetic


def cost_to_reach(costs: list[float], losses: list[float], target: float) -> float | None:
    """Cost at which a loss curve first reaches ``target``, linear between points; None if never."""
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return costs[0]
            c0, c1, l0 = costs[i - 1], costs[i], losses[i - 1]
            return c0 + (l0 - target) / (l0 - loss) * (c1 - c0)
    return None


def saving(costs: list[float], losses: list[float], target: float, reference_total: float) -> float | None:
    reached = cost_to_reach(costs, losses, target)
    return None if reached is None else 1.0 - reached / reference_total


BUDGETS = (0.25, 0.5, 0.75, 1.0)  # fractions of the scratch run's FLOPs


def labels_in(recs: list[dict]) -> list[str]:
    """The strategies present, in table order (labels of older runs, e.g. ``ligo-preserve``, last)."""
    present = {r["strategy"] for r in recs}
    return [s for s in STRATEGIES if s in present] + sorted(present - set(STRATEGIES))


def is_fitted(label: str) -> bool:
    return label == "ligo" or label.startswith("ligo-")


def loss_at(costs: list[float], losses: list[float], cost_point: float) -> float:
    """A curve's loss at ``cost_point``, linear between points (clamped to the curve's ends)."""
    if cost_point <= costs[0]:
        return losses[0]
    for i in range(1, len(costs)):
        if cost_point <= costs[i]:
            w = (cost_point - costs[i - 1]) / (costs[i] - costs[i - 1])
            return losses[i - 1] + w * (losses[i] - losses[i - 1])
    return losses[-1]


def savings_by_budget(costs: list[float], losses: list[float], ref_costs: list[float],
                      ref_losses: list[float]) -> dict[str, float | None]:
    """Saving against a scratch run stopped at each fraction of its budget (its loss there the target)."""
    out = {}
    for fraction in BUDGETS:
        budget = ref_costs[0] + fraction * (ref_costs[-1] - ref_costs[0])
        out[str(fraction)] = saving(costs, losses, loss_at(ref_costs, ref_losses, budget), budget)
    return out


# ----------------------------------------------------------------------------- models and data


def make_config(model: str, shape: tuple[int, int, int, int], vocab: int, seq_len: int, tok):
    layers, hidden, heads, ffn = shape
    if model == "gpt2":
        return GPT2Config(vocab_size=vocab, n_positions=seq_len, n_layer=layers, n_embd=hidden, n_head=heads,
                          n_inner=ffn, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    return BertConfig(vocab_size=vocab, max_position_embeddings=seq_len, num_hidden_layers=layers,
                      hidden_size=hidden, num_attention_heads=heads, intermediate_size=ffn,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=tok.pad_token_id)


def model_class(model: str):
    return GPT2LMHeadModel if model == "gpt2" else BertForMaskedLM


def target_config(small_config, shape: tuple[int, int, int, int]):
    layers, hidden, heads, ffn = shape
    return ligo_core.resolve_target({"layers": layers, "hidden": hidden, "heads": heads, "ffn": ffn}, small_config)


class CountingBatches:
    """Wraps a batch iterator and counts the batches drawn from it (for fitting FLOPs)."""

    def __init__(self, it):
        self.it, self.batches = it, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        self.batches += 1
        return batch


@dataclass
class Prepared:
    model: str
    objective: str
    tokenizer: object
    info: dict
    train_tokens: torch.Tensor
    heldout_tokens: torch.Tensor


def prepare(model: str, size: Size) -> Prepared:
    train_texts, heldout_texts = split_texts(default_corpus_texts()[: size.corpus_docs])
    tok = train_tokenizer(train_texts, size.vocab, style=model)
    return Prepared(
        model=model,
        objective="clm" if model == "gpt2" else "mlm",
        tokenizer=tok,
        info=tokenizer_info(tok),
        train_tokens=pack_tokens(train_texts, tok, size.seq_len),
        heldout_tokens=pack_tokens(heldout_texts, tok, size.seq_len)[: size.eval_seqs],
    )


def build_large(strategy: str, small, tconfig, data: Prepared, size: Size, seed: int, device):
    """(large model, growth FLOPs, growth wall seconds, info)."""
    started = time.perf_counter()
    if strategy == "scratch":
        torch.manual_seed(seed)
        return model_class(data.model)(tconfig), 0.0, 0.0, {}
    fit_batches = CountingBatches(batches(data.train_tokens, size.fit_batch_size(), seed=10_000 + seed))
    ligo_init = LIGO_VARIANTS.get(strategy)
    large, info = ligo_core.grow_model(
        copy.deepcopy(small), tconfig, strategy="ligo" if ligo_init else strategy,
        fit_steps=size.fit_steps if ligo_init else 0, train_batches=fit_batches, seed=seed, device=device,
        tokenizer=data.tokenizer, **({"ligo_init": ligo_init} if ligo_init else {}),
        **{k: v for k, v in {"noise": size.noise, "lr": size.fit_lr, "spread": size.spread}.items() if v is not None},
    )
    for param in large.parameters():  # grow_model returns weights that may not require grad
        param.requires_grad_(True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    fit_flops = info.get("fit_flops")
    if fit_flops is None:
        # Every batch grow_model drew costs a forward and backward pass of the large model, plus the
        # operator's own work per step (or one materialisation for the fixed strategies).
        fit_flops = cost.fit_flops(small.config, tconfig, strategy="ligo" if ligo_init else strategy,
                                   steps=fit_batches.batches,
                                   batch=size.fit_batch_size(), seq_len=size.seq_len,
                                   convention=FLOPS_CONVENTION)["flops"]
    return large, float(fit_flops), seconds, info


# ----------------------------------------------------------------------------- one model family


def loss_scorer(data: Prepared, device, tokens: torch.Tensor | None = None):
    """Loss of a model on fixed sequences (and masks): the held-out ones unless ``tokens`` are given."""
    tokens = data.heldout_tokens if tokens is None else tokens
    return lambda m: evaluate_loss(m, tokens, data.objective, tokenizer_info=data.info, seed=1234, device=device)


def pretrain_small(model: str, size: Size, data: Prepared, device, log=print):
    """The small model every strategy grows from, trained for ``size.small_steps``; (model, history)."""
    small_config = make_config(model, size.small, size.vocab, size.seq_len, data.tokenizer)
    torch.manual_seed(1234)
    small = model_class(model)(small_config)
    log(f"[{model}] small {size.small} {n_params(small) / 1e6:.2f}M params, pretraining {size.small_steps} steps")
    started = time.perf_counter()
    hist = train(small, batches(data.train_tokens, size.batch, seed=999), size.small_steps, lr=size.small_lr,
                 warmup=size.warmup(size.small_steps), weight_decay=size.weight_decay, objective=data.objective,
                 tokenizer_info=data.info, seed=999, device=device)
    small.cpu().eval()
    log(f"[{model}] small pretrained ({time.perf_counter() - started:.0f}s)")
    return small, hist


def run_model(model: str, size: Size, seeds: list[int], strategies: list[str], device, log,
              on_run=None) -> dict:
    """Pretrain the small model, then grow and train every (seed, strategy); ``on_run(result)`` after each."""
    size = size.for_model(model)
    data = prepare(model, size)
    eval_fn = loss_scorer(data, device)
    seen_fn = loss_scorer(data, device, data.train_tokens[: size.eval_seqs])
    small, small_hist = pretrain_small(model, size, data, device, log)
    small_loss = eval_fn(small)
    log(f"[{model}] small held-out loss {small_loss:.3f}")
    tconfig = target_config(small.config, size.large)

    per_token = train_flops_per_token(tconfig, size.seq_len)
    step_flops = per_token * size.batch * size.seq_len
    runs: list[dict] = []
    result = {
        "model": model, "small_loss": small_loss, "small_params": n_params(small),
        "small_train_loss_end": statistics.fmean(small_hist["train_loss"][-20:]),
        "large_params": n_params(model_class(model)(tconfig)), "step_flops": step_flops, "runs": runs,
        "source": _setting(small.config), "target": _setting(tconfig), "recipe": asdict(size),
    }
    for seed in seeds:
        for strategy in strategies:
            large, fit_flops, grow_seconds, info = build_large(strategy, small, tconfig, data, size, seed, device)
            init_loss = eval_fn(large)
            hist = train(large, batches(data.train_tokens, size.batch, seed=seed), size.steps, lr=size.lr,
                         warmup=size.warmup(size.steps), weight_decay=size.weight_decay, objective=data.objective,
                         tokenizer_info=data.info, eval_every=size.eval_every, eval_fn=eval_fn, seed=seed,
                         device=device)
            evals = hist["evals"]
            runs.append({
                "model": model, "strategy": strategy, "seed": seed,
                "steps": [e["step"] for e in evals],
                "losses": [e["loss"] for e in evals],
                # Loss on training sequences at the end: its gap to held-out shows memorisation of
                # the repeated corpus (scored once, not at every eval: that was 5% of the run).
                "final_seen_loss": seen_fn(large),
                "flops": [fit_flops + e["step"] * step_flops for e in evals],
                "wall": [grow_seconds + e["train_time"] for e in evals],
                "fit_flops": fit_flops, "grow_seconds": grow_seconds, "init_loss": init_loss,
                "ligo_init": info.get("ligo_init"),
                "fit_history": info.get("fit_history", []),
                "large_params": n_params(large),
            })
            log(f"[{model}] seed {seed} {strategy:<11} init {init_loss:.3f} -> final {evals[-1]['loss']:.3f}"
                f"  grow {grow_seconds:.1f}s train {hist['train_time']:.0f}s")
            del large
            if on_run:
                on_run(result)
    return result


def _setting(config) -> dict:
    sizes = ligo_core.sizes_of(config)
    return {k: sizes[k] for k in ("layers", "hidden", "heads", "ffn")}


def n_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ----------------------------------------------------------------------------- results


def records(result: dict) -> list[dict]:
    """One record per run; savings measured against the scratch run of the same seed."""
    out = []
    scratch = {r["seed"]: r for r in result["runs"] if r["strategy"] == "scratch"}
    for r in result["runs"]:
        ref = scratch.get(r["seed"])
        target = ref["losses"][-1] if ref else None
        rec = {
            "model": result["model"], "strategy": r["strategy"], "seed": r["seed"],
            "flops_saved": saving(r["flops"], r["losses"], target, ref["flops"][-1]) if ref else None,
            "flops_saved_fit_free": saving([f - r["fit_flops"] for f in r["flops"]], r["losses"], target,
                                           ref["flops"][-1]) if ref else None,
            "wall_saved": saving(r["wall"], r["losses"], target, ref["wall"][-1]) if ref else None,
            "flops_saved_by_budget": savings_by_budget(r["flops"], r["losses"], ref["flops"], ref["losses"])
            if ref else None,
            "final_loss": r["losses"][-1], "final_seen_loss": _final_seen_loss(r),
            "small_loss": result["small_loss"], "scratch_final_loss": target,
            "init_loss": r["init_loss"], "fit_flops": r["fit_flops"], "total_flops": r["flops"][-1],
            "source": result.get("source"), "target": result.get("target"),
        }
        out.append(rec)
    return out


def _final_seen_loss(run: dict) -> float | None:
    """Runs recorded before 2026-11-29 kept the training-sequence loss at every eval."""
    if "final_seen_loss" in run:
        return run["final_seen_loss"]
    return (run.get("train_sample_losses") or [None])[-1]


def _mean_spread(values: list[float | None], pct: bool = True, missing: str = "never reached",
                 signed: bool = False) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return missing
    scale, unit = (100.0, "%") if pct else (1.0, "")
    mean = statistics.fmean(got) * scale
    sign = "+" if signed else ""
    text = f"{mean:{sign}.1f}{unit}" if pct else f"{mean:{sign}.3f}"
    if len(got) > 1:
        text += f" ± {statistics.stdev(got) * scale:.1f}" if pct else f" ± {statistics.stdev(got):.3f}"
    if len(got) < len(values):
        text += f" ({len(values) - len(got)}/{len(values)} seeds never reached)"
    return text


BASELINES = ("stack", "interpolate", "net2net", "preserve")


def paired_gaps(recs: list[dict], strategy: str, baseline: str, key: str = "flops_saved") -> dict[int, float | None]:
    """Per seed, ``strategy``'s saving (``key``) minus ``baseline``'s (None where either never reached)."""
    saved = {(r["strategy"], r["seed"]): r.get(key) for r in recs}
    seeds = sorted({r["seed"] for r in recs if r["strategy"] == strategy})
    gaps = {}
    for seed in seeds:
        a, b = saved.get((strategy, seed)), saved.get((baseline, seed))
        gaps[seed] = None if a is None or b is None else a - b
    return gaps


def best_baseline(recs: list[dict]) -> str | None:
    """The baseline with the highest mean FLOPs saved (a run that never reached counts as 0), or,
    where no baseline reaches the scratch loss, the one with the lowest mean final loss."""
    ran = [b for b in BASELINES if any(r["strategy"] == b for r in recs)]
    if not ran:
        return None
    of = lambda b, key: [r[key] for r in recs if r["strategy"] == b]  # noqa: E731
    if any(v is not None for b in ran for v in of(b, "flops_saved")):
        return max(ran, key=lambda b: statistics.fmean(v or 0.0 for v in of(b, "flops_saved")))
    return min(ran, key=lambda b: statistics.fmean(of(b, "final_loss")))


EQUAL_FLOPS_POINTS = (0.05, 0.1, 0.25, 0.5, 1.0)  # fractions of the scratch run's FLOPs


def equal_flops_gaps(runs: list[dict], strategy: str, baseline: str) -> dict[str, list[float]]:
    """Per point, over seeds: ``strategy``'s held-out loss minus ``baseline``'s at the same FLOPs
    (negative: ``strategy`` is ahead). "fit" is where the fitted run starts training."""
    by = {(r["strategy"], r["seed"]): r for r in runs}
    gaps: dict[str, list[float]] = {}
    for (label, seed), run in sorted(by.items()):
        base, scratch = by.get((baseline, seed)), by.get(("scratch", seed))
        if label != strategy or base is None or scratch is None:
            continue
        points = {"fit": run["flops"][0], **{str(f): f * scratch["flops"][-1] for f in EQUAL_FLOPS_POINTS}}
        for name, flops in points.items():
            gap = loss_at(run["flops"], run["losses"], flops) - loss_at(base["flops"], base["losses"], flops)
            gaps.setdefault(name, []).append(gap)
    return gaps


def _equal_flops_table(runs: list[dict], best: str | None) -> list[str]:
    rows = []
    for variant in filter(is_fitted, labels_in(runs)):
        gaps = equal_flops_gaps(runs, variant, best) if best else {}
        if gaps:
            rows.append(f"| {variant} minus {best} | "
                        + " | ".join(_mean_spread(gaps[k], pct=False, signed=True) for k in gaps) + " |")
    if not rows:
        return []
    return [
        "Held-out loss at equal FLOPs (fitting counted; negative: the fitted operator is ahead), at the end",
        "of its fit and at fractions of the scratch run's FLOPs; curves interpolated between evals:",
        "",
        "| | end of fit | " + " | ".join(f"{int(100 * f)}%" for f in EQUAL_FLOPS_POINTS) + " |",
        "|---|---|" + "---|" * len(EQUAL_FLOPS_POINTS),
        *rows,
        "",
    ]


def _budget_table(recs: list[dict]) -> list[str]:
    if not any(r.get("flops_saved_by_budget") for r in recs):
        return []
    lines = [
        "FLOPs saved at shorter budgets: the target is the scratch run's held-out loss after that fraction",
        "of its FLOPs, and the saving is against that fraction. Read off the same full-length runs (a run",
        "planned for the shorter budget would decay its rate sooner and end lower), so indicative only:",
        "",
        "| strategy | " + " | ".join(f"{int(100 * f)}% budget" for f in BUDGETS) + " |",
        "|---|" + "---|" * len(BUDGETS),
    ]
    for strategy in [s for s in labels_in(recs) if s != "scratch"]:
        sr = [r for r in recs if r["strategy"] == strategy and r.get("flops_saved_by_budget")]
        if sr:
            lines.append(f"| {strategy} | " + " | ".join(
                _mean_spread([r["flops_saved_by_budget"][str(f)] for r in sr]) for f in BUDGETS) + " |")
    return lines + [""]


def _comparison(recs: list[dict]) -> list[str]:
    best = best_baseline(recs)
    if best is None:
        return []
    lines = []
    for key, what, fmt in (("flops_saved", "FLOPs saved (points)", lambda g: f"{100 * g:+.1f}"),
                           ("flops_saved_fit_free", "growth free (points)", lambda g: f"{100 * g:+.1f}"),
                           ("final_loss", "final loss (nats)", lambda g: f"{g:+.3f}")):
        parts = []
        for variant in filter(is_fitted, labels_in(recs)):
            gaps = paired_gaps(recs, variant, best, key)
            if gaps and any(g is not None for g in gaps.values()):
                parts.append(f"{variant} minus {best}: "
                             + ", ".join(f"seed {s}: " + ("n/a" if g is None else fmt(g)) for s, g in gaps.items()))
        if parts:
            lines.append(f"- {what}, paired by seed: " + "; ".join(parts) + ".")
    return [f"Best baseline: {best}.", "", *lines, ""] if lines else []


REGIME_MARGIN = calibration.REGIME_MARGIN  # nats: the scratch run must end this far below the small model


def _regime(margin: float) -> str:
    if margin >= REGIME_MARGIN:
        return f"Regime: valid (the scratch run ends {margin:.2f} >= {REGIME_MARGIN} nats below the small model)."
    where = f"only {margin:.2f} nats below" if margin >= 0 else f"{-margin:.2f} nats above"
    return (f"**Regime: NOT valid** (the scratch run ends {where} the small model; {REGIME_MARGIN} below "
            "needed): a grown model starts at about the scratch run's final loss, so these savings do not "
            "measure growth, and the cost estimate ignores them.")


def _recipe(r: dict) -> str:
    fit = f"LiGO fit {r['fit_steps']} steps x {r.get('fit_batch') or r['batch']} sequences"
    return (f"Recipe: small model pretrained {r['small_steps']} steps at peak rate {r['small_lr']:g}; every "
            f"large run {r['steps']} steps x {r['batch']} x {r['seq_len']} tokens at peak rate {r['lr']:g}; {fit}.")


def markdown(results: list[dict], recs: list[dict], meta: dict) -> str:
    lines = [
        "# Savings: growing vs training from scratch",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; device {meta['device']}; total wall time {meta['wall_minutes']:.1f} min.  ",
        f"Size `{meta['size']}`: {meta['size_fields']}",
        *([f"Tables rewritten from the recorded curves by `{meta['rerendered']}`."] if meta.get("rerendered") else []),
        *([meta["note"]] if meta.get("note") else []),
        "",
        *([] if meta.get("complete", True) else ["**Partial results: the run is in progress or stopped early.**", ""]),
        "FLOPs saved = 1 - (FLOPs to reach the scratch run's final held-out loss, growth and operator",
        "fitting included) / (FLOPs of the scratch run); wall time likewise (seconds of growth + training,",
        "evaluation excluded). Mean ± standard deviation over seeds; the small model's pretraining is",
        "not counted. Each seed's grown runs are compared with the scratch run of the same seed.",
        "The last column leaves the growth step's FLOPs (operator fitting, or one materialisation) out:",
        "what the grown start alone is worth, as when fitting is a negligible share of a long run.",
        "\"Seen sequences\": the same loss on a fixed sample of training sequences; a grown model has",
        "also read them through the small model, so a gap below held-out shows memorisation.",
        "",
    ]
    for res in results:
        rs = [r for r in recs if r["model"] == res["model"]]
        scratch_final = [r["scratch_final_loss"] for r in rs if r["strategy"] == "scratch"]
        lines += [
            f"## {res['model']}",
            "",
            f"Small model {res['small_params'] / 1e6:.2f}M parameters, held-out loss {res['small_loss']:.3f}; "
            f"large model {res['large_params'] / 1e6:.2f}M parameters "
            f"({res['large_params'] / res['small_params']:.1f}x); scratch final loss "
            f"{_mean_spread(scratch_final, pct=False)} "
            f"({res['small_loss'] - statistics.fmean(scratch_final):+.2f} nats: small minus scratch).",
            *([_recipe(res["recipe"]), ""] if res.get("recipe") else [""]),
            _regime(res["small_loss"] - statistics.fmean(scratch_final)),
            "",
            "| strategy | FLOPs saved | wall time saved | loss at step 0 | final loss | final loss, seen sequences "
            "| FLOPs saved, growth free |",
            "|---|---|---|---|---|---|---|",
        ]
        for strategy in labels_in(rs):
            sr = [r for r in rs if r["strategy"] == strategy]
            if not sr:
                continue
            lines.append(
                f"| {strategy} | {_mean_spread([r['flops_saved'] for r in sr])} "
                f"| {_mean_spread([r['wall_saved'] for r in sr])} "
                f"| {_mean_spread([r['init_loss'] for r in sr], pct=False)} "
                f"| {_mean_spread([r['final_loss'] for r in sr], pct=False)} "
                f"| {_mean_spread([r.get('final_seen_loss') for r in sr], pct=False, missing='-')} "
                f"| {_mean_spread([r.get('flops_saved_fit_free') for r in sr])} |"
            )
        lines.append("")
        lines += _comparison(rs)
        lines += _equal_flops_table(res["runs"], best_baseline(rs))
        lines += _budget_table(rs)
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    colors = dict(zip(STRATEGIES, ("black", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red", "tab:pink")))
    for ax, res in zip(axes[0], results):
        seeds = sorted({r["seed"] for r in res["runs"]})
        for r in res["runs"]:
            ax.plot([f / 1e12 for f in r["flops"]], r["losses"], color=colors.get(r["strategy"], "gray"),
                    alpha=0.9 if r["seed"] == seeds[0] else 0.35, lw=1.4,
                    label=r["strategy"] if r["seed"] == seeds[0] else None)
        scratch = [r["losses"][-1] for r in res["runs"] if r["strategy"] == "scratch"]
        if scratch:
            ax.axhline(statistics.fmean(scratch), color="black", ls=":", lw=1, label="scratch final")
        ax.axhline(res["small_loss"], color="gray", ls="--", lw=1, label="small model")
        finals = [r["losses"][-1] for r in res["runs"]]
        ax.set_ylim(min(finals) - 0.15, max(res["small_loss"], max(finals)) + 0.6)
        ax.set_title(f"{res['model']}: held-out loss vs training FLOPs ({len(seeds)} seeds)")
        ax.set_xlabel("FLOPs (1e12), growth + fitting + training")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def rewrite_report(curves_path: Path, calibration_to: Path | None = None) -> list[dict]:
    """Tables and records again from a finished run's curves (after the report gained a column)."""
    saved = json.loads(curves_path.read_text())
    saved["meta"]["rerendered"] = f"python bench/savings.py --report {curves_path}"
    recs = write_tables(curves_path.parent, saved["results"], saved["meta"])
    if calibration_to is not None and saved["meta"].get("complete", True):
        write_calibration(calibration_to, recs)
    return recs


REFERENCE_OUT = Path(__file__).resolve().parents[1] / "docs" / "results"
CALIBRATION = Path(calibration.MEASURED_PATH)


def calibration_path(out: Path, given: str | None) -> Path | None:
    """Where a completed run's records go as the estimate's calibration: ``--calibration`` if
    given ('' for nowhere), else the package's file for the reference run only (probes in other
    folders must not change what ``ligo estimate`` says)."""
    if given is not None:
        return Path(given) if given else None
    return CALIBRATION if out.resolve() == REFERENCE_OUT else None


def write_calibration(path: Path, recs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recs, indent=1) + "\n")


def write_tables(out: Path, results: list[dict], meta: dict) -> list[dict]:
    """savings.json (one record per run) and savings.md from the runs' curves; returns the records."""
    recs = [rec for res in results for rec in records(res)]
    (out / "savings.json").write_text(json.dumps(recs, indent=1) + "\n")
    (out / "savings.md").write_text(markdown(results, recs, meta))
    return recs


def with_overrides(size: Size, overrides: dict) -> Size:
    """``size`` with the command line's values, which win over a family's own values too."""
    return replace(size, **overrides, bert={k: v for k, v in size.bert.items() if k not in overrides})


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="gpt2,bert")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                   help=f"comma-separated, from {', '.join(STRATEGIES)} (default: all but ligo-stack)")
    p.add_argument("--size", choices=sorted(SIZES), default="default")
    p.add_argument("--steps", type=int, help="training steps of every large run (overrides the size)")
    p.add_argument("--small-steps", type=int, help="pretraining steps of the small model")
    p.add_argument("--lr", type=float, help="peak learning rate of every large run (overrides the size and family)")
    p.add_argument("--fit-steps", type=int, help="LiGO operator fitting steps")
    p.add_argument("--fit-batch", type=int, help="sequences per LiGO fitting step (default: the training batch)")
    p.add_argument("--fit-lr", type=float, help="LiGO fitting's peak learning rate (default: the engine's)")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--noise", type=float, help="growth's symmetry breaking in [0, 1] (default: the engine's)")
    p.add_argument("--spread", type=float, help="how far growth moves copied units apart (default: the engine's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest for the tiny size on a busy machine)")
    p.add_argument("--out", default="docs/results")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--report", metavar="CURVES_JSON",
                   help="train nothing: rewrite savings.md and savings.json beside this savings_curves.json")
    p.add_argument("--calibration", metavar="PATH",
                   help="when the run completes, also write its records here, as the cost estimate's measured "
                        "calibration (default: ligo_core/data/calibration.json for --out docs/results, "
                        "nowhere for other folders; '' for nowhere)")
    args = p.parse_args(argv)
    if args.report:
        if not Path(args.report).is_file():
            p.error(f"--report: no curves file at {args.report} (a finished run writes savings_curves.json)")
        return rewrite_report(Path(args.report), calibration_path(Path(args.report).parent, args.calibration))

    size = SIZES[args.size]
    overrides = {k: v for k, v in {"steps": args.steps, "small_steps": args.small_steps, "lr": args.lr,
                                   "fit_steps": args.fit_steps, "fit_batch": args.fit_batch, "fit_lr": args.fit_lr,
                                   "eval_every": args.eval_every, "noise": args.noise,
                                   "spread": args.spread}.items() if v is not None}
    size = with_overrides(size, overrides)
    models = [m for m in args.models.split(",") if m]
    strategies = [s for s in args.strategies.split(",") if s]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    for s in strategies:
        if s not in STRATEGIES:
            p.error(f"unknown strategy {s!r}; choose from {', '.join(STRATEGIES)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # 19% of a GPT-2 CPU step was page faults (ligo_core/allocator.py)
    device = default_device(args.device)
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"{time.perf_counter() - started:7.0f}s  {msg}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calibration_to = calibration_path(out, args.calibration)

    def write(results: list[dict], final: bool) -> list[dict]:
        # Written after every run, so that a long run that stops early still leaves its results.
        meta = {
            "command": "python bench/savings.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine_description(), "device": str(device), "size": args.size,
            "size_fields": json.dumps(asdict(size)), "wall_minutes": (time.perf_counter() - started) / 60,
            "complete": final,
        }
        (out / "savings_curves.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
        recs = write_tables(out, results, meta)
        if final and not args.no_plot:
            plot(results, out / "savings_loss_curves.png")
        if final and calibration_to is not None:
            write_calibration(calibration_to, recs)
        return recs

    results: list[dict] = []
    for m in models:
        # run_model's result joins `results` when it returns; until then on_run writes it alongside.
        results.append(run_model(m, size, seeds, strategies, device, log,
                                 on_run=lambda res: write(results + [res], final=False)))
    recs = write(results, final=True)
    log(f"wrote {out}/savings.md, savings.json, savings_curves.json" + ("" if args.no_plot else ", savings_loss_curves.png")
        + (f"; the estimate's calibration {calibration_to}" if calibration_to else ""))
    return recs


if __name__ == "__main__":
    main()
