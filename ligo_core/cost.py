"""Cost-savings estimate: FLOPs, GPU-hours and money of growing versus training from scratch.

Every number is either computed from the configs (FLOPs), read from a table with its source
(accelerator peaks, prices, calibrated savings), or an assumption named in the output. The
model, formulas and sources are described in docs/COST.md.

    scratch = tokens x train FLOPs per token of the large model
    fit     = steps x batch x seq x train FLOPs per token + the operator's own work
    grown   = fit + (1 - calibrated savings) x scratch
    savings = 1 - grown / scratch
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import PretrainedConfig

from ligo_core.calibration import (
    STRATEGY_PROXY,
    UNCERTAINTY,
    Record,
    calibration_records,
    log_distance,
)
from ligo_core.catalog import DEFAULT_BATCH_SIZE, DEFAULT_FIT_STEPS, DEFAULT_SEQ_LEN, STRATEGY_NAMES
from ligo_core.errors import EstimateError
from ligo_core.families import MASK_PROBABILITY
from ligo_core.families import MATRIX_SHAPES as SHAPES
from ligo_core.matrices import global_matrices, layer_matrices, num_parameters
from ligo_core.targets import check_growth, family_of, sizes_of

# --- counting conventions ----------------------------------------------------------------------

@dataclass(frozen=True)
class Convention:
    backward: float  # backward FLOPs as a multiple of forward FLOPs
    dense_embeddings: bool  # embedding lookups counted as one-hot products, 2 x rows x hidden
    mlm_head_fraction: float  # share of tokens through the LM head, masked-LM families
    operator: str  # "step": once per fitting step; "reference": the LiGO repo's count, per sequence
    description: str


CONVENTIONS = {
    "standard": Convention(
        2.0, False, 1.0, "step",
        "matrix products only, 2 FLOPs per multiply-add; backward = 2 x forward; embedding lookups "
        "free; LM head on every token; operator work once per fitting step",
    ),
    "paper": Convention(
        1.0, True, 0.15625, "reference",
        "the LiGO paper's count (ELECTRA's flop counter in the reference repo's flop_computation.py): "
        "backward = forward; embedding lookups as dense products; masked-LM head on 15.6% of tokens; "
        "operator work counted per sequence as the reference code does",
    ),
    "engine": Convention(
        2.0, False, MASK_PROBABILITY, "step",
        "what ligo_core itself computes when it trains, fits or scores: as standard, but a masked LM's "
        "head (transform and decoder) on the masked 15% of tokens only",
    ),
}


def forward_flops_per_token(config: PretrainedConfig, seq_len: int, convention: str = "standard") -> float:
    """Forward FLOPs per token of a model, attention scores (QK^T and AV) included."""
    conv = _convention(convention)
    s, shape = sizes_of(config), SHAPES[family_of(config).name]
    h, q = s["hidden"], s["heads"] * s["head_dim"]
    per_layer = sum(2 * o * i for o, i in layer_matrices(config)) + 2 * 2 * seq_len * q  # QK^T + AV
    head = 2 * h * config.vocab_size + (2 * h * h if shape.head_transform else 0)
    if family_of(config).objective == "mlm":
        head *= conv.mlm_head_fraction
    embed = 0.0
    if conv.dense_embeddings:
        rows = config.vocab_size + (seq_len if shape.positions else 0)
        rows += getattr(config, shape.token_types) if shape.token_types else 0
        embed = 2 * h * rows
    return s["layers"] * per_layer + head + embed


def train_flops_per_token(config: PretrainedConfig, seq_len: int, convention: str = "standard") -> float:
    return (1 + _convention(convention).backward) * forward_flops_per_token(config, seq_len, convention)


def operator_flops(source: PretrainedConfig, target: PretrainedConfig) -> float:
    """Forward FLOPs of materialising the large weights once from the small ones.

    Depth mixing ``sum_j w[l, j] W[j]`` at the small size, then the width expansion
    ``E_out W F_in^T``. Expanders are ``[diag; C]`` (an old unit is a scaled copy, new units are
    free rows), so only the ``d2 - d1`` new rows on each side cost a matrix product.
    """
    l1, l2 = sizes_of(source)["layers"], sizes_of(target)["layers"]

    def width(small, large):
        (o1, i1), (o2, i2) = small, large
        return 2 * (o2 - o1) * o1 * i1 + 2 * (i2 - i1) * i1 * o2

    per_layer = sum(
        2 * l1 * o1 * i1 + width((o1, i1), big)
        for (o1, i1), big in zip(layer_matrices(source), layer_matrices(target))
    )
    return l2 * per_layer + sum(width(a, b) for a, b in zip(global_matrices(source), global_matrices(target)))


def reference_operator_flops(source: PretrainedConfig, target: PretrainedConfig) -> float:
    """The LiGO reference repo's count of the operator's work, per sequence and large layer.

    Its ``FusedTransformerHparams`` adds, to every large layer: depth blending at the large size
    (``2 L1 out2 in2`` for the attention input, attention output, FFN in and FFN out, the three
    attention inputs counted once) and width terms for the new residual units only
    (``4 (D2-D1) D1^2`` per attention matrix, ``4 (D2-D1) D1 F2`` for FFN in, ``2 (D2-D1) D2 F2``
    for FFN out). Its training count multiplies this by the batch size, like a per-token cost.
    """
    a, b = sizes_of(source), sizes_of(target)
    shape = SHAPES[family_of(target).name]
    d1, d2, f2, l1 = a["hidden"], b["hidden"], b["ffn"], a["layers"]
    q2 = b["heads"] * b["head_dim"]
    depth = 2 * l1 * (2 * d2 * q2 + (shape.ffn_inputs + 1) * d2 * f2)
    width = 2 * 4 * (d2 - d1) * d1 * d1 + shape.ffn_inputs * 4 * (d2 - d1) * d1 * f2 + 2 * (d2 - d1) * d2 * f2
    return b["layers"] * (depth + width)


def fit_flops(
    source: PretrainedConfig, target: PretrainedConfig, *, strategy: str = "ligo", steps: int = DEFAULT_FIT_STEPS,
    batch: int = DEFAULT_BATCH_SIZE, seq_len: int = DEFAULT_SEQ_LEN, convention: str = "standard",
) -> dict:
    """Fitting cost: ``steps`` training steps of the large model plus the operator's work.

    Fixed strategies (stack, interpolate, net2net, preserve) do not fit: they cost one
    materialisation of the operator.
    """
    conv = _convention(convention)
    if strategy != "ligo":
        op = operator_flops(source, target)
        return {"steps": 0, "tokens": 0, "model_flops": 0.0, "operator_flops": op, "flops": op}
    tokens = steps * batch * seq_len
    model = tokens * train_flops_per_token(target, seq_len, convention)
    if conv.operator == "reference":
        op = steps * batch * (1 + conv.backward) * reference_operator_flops(source, target)
    else:
        op = steps * (1 + conv.backward) * operator_flops(source, target)
    return {"steps": steps, "tokens": tokens, "model_flops": model, "operator_flops": op, "flops": model + op}


# --- expected savings from the calibration table -------------------------------------------------

def _interpolate(records: list[Record], query: tuple[float, float], scale: float | None = None) -> dict:
    """Inverse-squared-distance mean of the records' savings in (ln depth ratio, ln width ratio),
    and ln scale (the large model's width, weighted by ``SCALE_WEIGHT``) when ``scale`` is given.

    An exact setting gives its own value (the mean, when several results share it); the range's
    half-width is the records' own spread plus ``per_log_ratio`` x the distance to the nearest.
    """
    dists = [log_distance(query, (r.depth_ratio, r.width_ratio), (scale, r.scale) if scale else None)
             for r in records]
    nearest = min(dists)
    weights = [float(d < 1e-9) for d in dists] if nearest < 1e-9 else [1.0 / d**2 for d in dists]
    weights = [w / sum(weights) for w in weights]
    fraction = sum(w * r.saved for w, r in zip(weights, records))
    spread = sum(w * (UNCERTAINTY["single_run"] if r.spread is None else r.spread) for w, r in zip(weights, records))
    half = spread + UNCERTAINTY["per_log_ratio"] * nearest
    used = sorted((x for x in zip(weights, records, dists) if x[0] > 1e-4), key=lambda x: -x[0])
    if nearest < 1e-9:  # several results at this setting (the paper's and ours): the range spans them
        half = max(half, (max(r.saved for _, r, _ in used) - min(r.saved for _, r, _ in used)) / 2)
        basis = "; ".join(f"{r.kind} {r.saved:.1%} at {r.setting} ({r.source})" for _, r, _ in used)
    else:
        r = used[0][1]
        basis = (f"interpolated from {len(used)} {r.strategy} setting{'s' * (len(used) > 1)}, nearest "
                 f"{r.setting} ({r.kind} {r.saved:.1%}, {r.source}) at distance {nearest:.2f}")
    evidence = [
        {"setting": r.setting, "strategy": r.strategy, "saved": r.saved, "kind": r.kind, "source": r.source,
         "note": r.note, "weight": round(w, 4), "distance": round(d, 4)}
        for w, r, d in used
    ]
    return {"fraction": fraction, "half": half, "basis": basis, "evidence": evidence}


def expected_savings(
    family: str, strategy: str, depth_ratio: float, width_ratio: float, records: list[Record] | None = None,
    scale: float | None = None,
) -> dict:
    """Calibrated fraction of the scratch training FLOPs that growth saves, with its range and basis.

    In order of preference: settings of this family and strategy; this family's ``ligo`` estimate
    times the strategy's ratio to ``ligo`` measured in other families; other families' settings of
    the strategy. A strategy with no settings at all borrows a similar one's (``STRATEGY_PROXY``).
    Each fallback widens the range (``UNCERTAINTY``). ``scale``, the large model's width, makes
    settings measured at a distant scale count less (``calibration.SCALE_WEIGHT``).
    """
    records = calibration_records() if records is None else records
    query = (depth_ratio, width_ratio)
    used = strategy
    if not any(r.strategy == strategy for r in records) and strategy in STRATEGY_PROXY:
        used = STRATEGY_PROXY[strategy]

    def of(fam, strat):
        return [r for r in records if r.family == fam and r.strategy == strat]

    pool = [r for r in records if r.strategy == used]
    if not pool:
        raise EstimateError(f"no calibration data for strategy {strategy!r}", field="strategy")
    anchors = sorted({r.family for r in pool if r.family != family and of(r.family, "ligo")})
    if of(family, used):
        est = _interpolate(of(family, used), query, scale)
    elif used != "ligo" and of(family, "ligo") and anchors:
        # This family's ligo estimate, scaled by how the strategy compares with ligo elsewhere.
        pairs = [(r, _interpolate(of(r.family, "ligo"), (r.depth_ratio, r.width_ratio), r.scale)["fraction"])
                 for f in anchors for r in of(f, used)]
        pairs = [(r, lig) for r, lig in pairs if lig > 0.05]
        ratio = sum(r.saved / lig for r, lig in pairs) / len(pairs)
        base = _interpolate(of(family, "ligo"), query, scale)
        est = {
            "fraction": base["fraction"] * ratio,
            "half": base["half"] * abs(ratio) + UNCERTAINTY["other_family"],
            "basis": (f"no {used} setting of {family}: its ligo estimate {base['fraction']:.1%} x {used}/ligo "
                      f"ratio {ratio:.2f} from {', '.join(r.setting for r, _ in pairs)}; ligo: {base['basis']}"),
            "evidence": base["evidence"] + [
                {"setting": r.setting, "strategy": r.strategy, "saved": r.saved, "kind": r.kind,
                 "source": r.source, "note": f"{used}/ligo ratio {r.saved / lig:.2f}", "weight": None,
                 "distance": None}
                for r, lig in pairs
            ],
        }
    else:
        est = _interpolate(pool, query, scale)
        est["half"] += UNCERTAINTY["other_family"]
        est["basis"] = f"no {used} setting of {family}; other families': {est['basis']}"
    if used != strategy:
        est["half"] += UNCERTAINTY["proxy_strategy"]
        est["basis"] = f"no data for {strategy}; {used} used as a proxy: {est['basis']}"
    return {
        "fraction": est["fraction"],
        "low": max(-1.0, est["fraction"] - est["half"]),
        "high": min(0.99, est["fraction"] + est["half"]),
        "basis": est["basis"],
        "evidence": est["evidence"],
    }


# --- accelerators and money ---------------------------------------------------------------------

@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_tflops: float  # dense (no sparsity) bf16 tensor throughput, fp16 where there is no bf16
    price: float  # assumed on-demand USD per GPU-hour
    source: str


# Peaks are the vendors' datasheet figures without structured sparsity (datasheets print the
# sparse figure, twice these). Prices are assumed typical on-demand list prices in USD per
# accelerator-hour (2024-2025, GPU clouds and the big three); they vary by provider and month:
# pass the real one with --price.
ACCELERATORS = {
    a.name: a
    for a in (
        Accelerator("H100", 989, 2.99, "NVIDIA H100 SXM datasheet: BF16 1,979 TFLOPS with sparsity"),
        Accelerator("H100-PCIe", 756, 2.49, "NVIDIA H100 PCIe datasheet: BF16 1,513 TFLOPS with sparsity"),
        Accelerator("H200", 989, 3.50, "NVIDIA H200 SXM datasheet: BF16 1,979 TFLOPS with sparsity"),
        Accelerator("B200", 2250, 5.00, "NVIDIA HGX B200 spec: BF16 4.5 PFLOPS per GPU with sparsity"),
        Accelerator("A100", 312, 1.79, "NVIDIA A100 datasheet: BF16 312 TFLOPS (624 with sparsity)"),
        Accelerator("A10", 125, 0.75, "NVIDIA A10 datasheet: BF16 125 TFLOPS (250 with sparsity)"),
        Accelerator("A10G", 70, 1.01, "AWS publishes no tensor figure for the A10G (lower clocks than the A10); "
                                      "70 TFLOPS is the commonly quoted BF16 figure, an estimate"),
        Accelerator("L4", 121, 0.80, "NVIDIA L4 datasheet: BF16 242 TFLOPS with sparsity"),
        Accelerator("L40S", 362, 1.86, "NVIDIA L40S datasheet: BF16 362 TFLOPS (733 with sparsity)"),
        Accelerator("V100", 125, 3.06, "NVIDIA V100 SXM2 datasheet: FP16 tensor 125 TFLOPS (no BF16)"),
        Accelerator("T4", 65, 0.53, "NVIDIA T4 datasheet: FP16 tensor 65 TFLOPS (no BF16)"),
        Accelerator("MI300X", 1307, 2.00, "AMD Instinct MI300X datasheet: BF16 1,307.4 TFLOPS dense"),
        Accelerator("TPU-v4", 275, 3.22, "Google Cloud TPU v4 docs: 275 BF16 TFLOPS per chip"),
        Accelerator("TPU-v5e", 197, 1.20, "Google Cloud TPU v5e docs: 197 BF16 TFLOPS per chip"),
        Accelerator("TPU-v5p", 459, 4.20, "Google Cloud TPU v5p docs: 459 BF16 TFLOPS per chip"),
    )
}
DEFAULT_UTILISATION = 0.4  # model FLOPs utilisation of a well-tuned training run (typically 0.3-0.5)
TOKENS_PER_PARAMETER = 20  # compute-optimal budget (Hoffmann et al. 2022, "Chinchilla")


def accelerator(name: str) -> Accelerator:
    def key(s):
        return "".join(ch for ch in s.lower() if ch.isalnum()).removesuffix("sxm")

    found = {key(a.name): a for a in ACCELERATORS.values()}.get(key(str(name)))
    if found is None:
        raise EstimateError(f"unknown GPU {name!r}; known: {', '.join(ACCELERATORS)}", field="gpu")
    return found


def gpu_hours(flops: float, gpu: Accelerator, utilisation: float) -> float:
    return flops / (gpu.peak_tflops * 1e12 * utilisation) / 3600


# --- the estimate -------------------------------------------------------------------------------

def estimate(
    source_config: PretrainedConfig,
    target_config: PretrainedConfig,
    *,
    strategy: str = "ligo",
    fit_steps: int = DEFAULT_FIT_STEPS,
    fit_batch: int = DEFAULT_BATCH_SIZE,  # what `ligo grow` fits with
    seq_len: int = DEFAULT_SEQ_LEN,
    tokens: int | None = None,
    gpu: str = "H100",
    price_per_gpu_hour: float | None = None,
    utilisation: float | None = None,
    convention: str = "standard",
    measured_path: str | Path | None = None,
) -> dict:
    """Scratch versus grown cost of the target model, with expected savings and assumptions."""
    if strategy not in STRATEGY_NAMES:
        raise EstimateError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGY_NAMES)}",
                            field="strategy")
    conv = _convention(convention)
    _check_int("fit_steps", fit_steps, minimum=0)
    _check_int("fit_batch", fit_batch, minimum=1)
    _check_int("seq_len", seq_len, minimum=1)
    if tokens is not None:
        _check_int("tokens", tokens, minimum=1)
    acc = accelerator(gpu)
    util = DEFAULT_UTILISATION if utilisation is None else utilisation
    if not (isinstance(util, (int, float)) and 0 < util <= 1):
        raise EstimateError(f"utilisation must be in (0, 1], got {util!r}", field="utilisation")
    price = acc.price if price_per_gpu_hour is None else price_per_gpu_hour
    if not (isinstance(price, (int, float)) and math.isfinite(price) and price >= 0):
        raise EstimateError(f"price per GPU-hour must be a non-negative number, got {price!r}",
                            field="price_per_gpu_hour")
    check_growth(source_config, target_config)  # TargetError when the target shrinks or differs
    positions = SHAPES[family_of(target_config).name].positions
    if positions and seq_len > getattr(target_config, positions):
        raise EstimateError(f"seq_len {seq_len} exceeds the model's {positions}={getattr(target_config, positions)}",
                            field="seq_len")

    family = family_of(target_config).name
    small, large = sizes_of(source_config), sizes_of(target_config)
    params = num_parameters(target_config)
    planned = tokens if tokens is not None else TOKENS_PER_PARAMETER * params
    per_token = train_flops_per_token(target_config, seq_len, convention)
    scratch = planned * per_token
    fit = fit_flops(source_config, target_config, strategy=strategy, steps=fit_steps, batch=fit_batch,
                    seq_len=seq_len, convention=convention)
    cal = expected_savings(family, strategy, large["layers"] / small["layers"], large["hidden"] / small["hidden"],
                           calibration_records(measured_path), scale=large["hidden"])

    def grown_flops(saved):
        return fit["flops"] + (1 - saved) * scratch

    def money(flops):
        hours = gpu_hours(flops, acc, util)
        return {"gpu_hours": hours, "cost_usd": hours * price}

    grown = grown_flops(cal["fraction"])
    return {
        "family": family,
        "strategy": strategy,
        "convention": convention,
        "source": {**small, "parameters": num_parameters(source_config)},
        "target": {**large, "parameters": params},
        "flops_per_token": {"forward": forward_flops_per_token(target_config, seq_len, convention), "train": per_token},
        "scratch": {"tokens": planned, "flops": scratch, **money(scratch)},
        "fit": {**fit, "batch": fit_batch if fit["steps"] else 0, "seq_len": seq_len, **money(fit["flops"])},
        "grown": {
            "train_tokens": (1 - cal["fraction"]) * planned,
            "train_flops": (1 - cal["fraction"]) * scratch,
            "flops": grown,
            "flops_low": grown_flops(cal["high"]),
            "flops_high": grown_flops(cal["low"]),
            **money(grown),
        },
        "savings": {
            "fraction": 1 - grown / scratch,
            "low": 1 - grown_flops(cal["low"]) / scratch,
            "high": 1 - grown_flops(cal["high"]) / scratch,
            "flops": scratch - grown,
            **money(scratch - grown),
            "basis": cal["basis"],
            "calibrated": {k: cal[k] for k in ("fraction", "low", "high")},
            "evidence": cal["evidence"],
        },
        "assumptions": {
            "gpu": acc.name,
            "peak_tflops": acc.peak_tflops,
            "peak_source": acc.source,
            "utilisation": util,
            "utilisation_source": "given" if utilisation is not None else "default (typical model FLOPs utilisation)",
            "price_per_gpu_hour": price,
            "price_source": "given" if price_per_gpu_hour is not None else "assumed typical on-demand list price (USD)",
            "tokens": planned,
            "tokens_source": "given" if tokens is not None else f"{TOKENS_PER_PARAMETER} tokens per parameter",
            "seq_len": seq_len,
            "convention": {"name": convention, **asdict(conv)},
            "savings_definition": "1 - (fitting + training FLOPs to reach the scratch run's final loss) / "
                                  "(scratch FLOPs); the calibrated fraction is the training share saved, "
                                  "the fitting at the given steps is added on top",
            "grown_model": "small-model pretraining is not counted (the source checkpoint exists)",
        },
    }


def _convention(name: str) -> Convention:
    if name not in CONVENTIONS:
        raise EstimateError(f"unknown convention {name!r}; known: {', '.join(CONVENTIONS)}", field="convention")
    return CONVENTIONS[name]


def _check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EstimateError(f"{name} must be a whole number >= {minimum}, got {value!r}", field=name)


# --- measured probe -----------------------------------------------------------------------------

def measured_probe(
    grown_model,
    random_model,
    batches: Iterable,
    steps: int,
    *,
    loss_fn: Callable | None = None,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    seed: int = 0,
    device=None,
) -> dict:
    """Train the grown and a randomly initialised large model for ``steps`` identical steps.

    Both models see the same batches in the same order with the same AdamW settings and the
    same random seed (dropout); the models are trained in place. ``loss_fn(model, batch) -> scalar tensor`` defaults to a
    Hugging Face causal-LM loss (``labels=input_ids``); pass the family's objective for masked
    LMs. This is a short-horizon measurement: a gap after K steps says how far ahead the grown
    model starts, not what it saves over a full training run.
    """
    import torch

    _check_int("steps", steps, minimum=1)
    loss_fn = loss_fn or (lambda model, batch: model(input_ids=batch, labels=batch).loss)
    batches = [b for _, b in zip(range(steps), batches)]
    if len(batches) < steps:
        raise EstimateError(f"measured probe needs {steps} batches, got {len(batches)}")

    def train(model):
        torch.manual_seed(seed)
        if device is not None:
            model.to(device)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        losses = []
        for batch in batches:
            batch = batch.to(device) if device is not None else batch
            loss = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
        return losses

    grown_losses, random_losses = train(grown_model), train(random_model)
    start = grown_losses[0]
    caught_up = next((i + 1 for i, loss in enumerate(random_losses) if loss <= start), None)
    return {
        "kind": "short-horizon measurement",
        "steps": steps,
        "grown": {"first_loss": grown_losses[0], "final_loss": grown_losses[-1], "losses": grown_losses},
        "random": {"first_loss": random_losses[0], "final_loss": random_losses[-1], "losses": random_losses},
        "loss_gap": random_losses[-1] - grown_losses[-1],
        "random_steps_to_grown_first_loss": caught_up,
        "note": f"training losses after {steps} identical steps; a positive gap means the grown model is "
                "ahead. It does not measure the savings of a full run (see savings.basis for those).",
    }


__all__ = [
    "ACCELERATORS", "CONVENTIONS", "EstimateError", "SHAPES", "accelerator", "estimate",
    "expected_savings", "fit_flops", "forward_flops_per_token", "measured_probe", "num_parameters",
    "operator_flops", "reference_operator_flops", "train_flops_per_token",
]
