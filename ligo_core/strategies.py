"""Initial growth operators: the baselines as fixed instances, and LiGO's starting point.

Each space is built from a list saying, for every unit of the large model, where it comes
from: a copy of an old unit (with a scale), the mean of all old units (new residual units under
LayerNorm keep the mean and variance of the stream), or zero (new residual units under RMSNorm,
padded head dimensions).

- ``preserve``: residual stream = k copies + mean/zero pads, heads and FFN units copied in turn,
  the input side divided among the copies with random shares (breaks symmetry, keeps the sum);
  new layers are copies whose block outputs are zero (and whose copied units' incoming weights
  are scaled apart, see ``_jitter_copies``). Exact for pre-norm families.
- ``stack`` / ``interpolate``: the same widths, depth by repeating the stack / each layer.
- ``net2net``: bert2BERT-FPI widths (new units copy random old units, inputs divided by the
  count), stacked depth.
- ``ligo``: starts as ``preserve``; every expander and depth coefficient is then learned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ligo_core.catalog import DEFAULT_LIGO_INIT, DEFAULT_NOISE, check_growth_options, default_spread
from ligo_core.families import Family, TensorSpec
from ligo_core.operator import ExpanderInit, GrowthOperator, PlannedExpander, compact, dense

COPY, MEAN, ZERO = "copy", "mean", "zero"

# Symmetry breaking, ``noise`` in [0, 1] (default 1): copies split their outgoing weights with
# shares (1 + z) / count, z spread over [-noise, noise]; copies in zero-output blocks scale their
# incoming weights by 1 +- noise / 2; pads read old units through paired noise of std
# PAD_NOISE * noise. All exact. Under AdamW copies separate only as fast as these make them
# differ (docs/GROWTH.md: at 0.1 they were still at cosine 0.9997 after 600 steps).
PAD_NOISE = 0.1
# Copies' incoming weights moved apart after growth, first-order exact (ligo_core/separation.py):
# each strategy's default `spread` is in ligo_core/catalog.py (`preserve` moves nothing unless
# asked; the others are followed by training, which the moved copies serve; docs/GROWTH.md,
# "Moving copies apart").


@dataclass(frozen=True)
class Source:
    kind: str  # COPY, MEAN or ZERO
    unit: int = -1
    scale: float = 1.0


def _expander_from_sources(sources: list[Source], d1: int, generator: torch.Generator, noise: float,
                           even_shares: bool = False, sparse: bool = False) -> ExpanderInit:
    """Build ``P [diag(top); C]`` for E, and the matching input side F with ``F^T E = I``.

    ``even_shares``: copies split the input side evenly (``noise`` then only reaches the pads).
    ``sparse``: C comes back as a coalesced sparse (r, d1) tensor (``operator.compact``'s layout).

    The walk over units is plain Python collecting indices; the tensors are filled in bulk
    (element-wise tensor writes made this the slowest part of growing a 355M model).
    """
    d2 = len(sources)
    sources = _ensure_coverage(list(sources), d1)
    counts = [0] * d1
    for s in sources:
        if s.kind == COPY:
            counts[s.unit] += 1
    shares = _random_shares(counts, generator, 0.0 if even_shares else noise)
    top_e, top_f = torch.ones(d1), torch.ones(d1)
    order = [0] * d2
    top_units, top_scales, top_shares = [], [], []
    new_rows, new_units, new_scales, new_shares, mean_rows, pad_rows = [], [], [], [], [], []
    used = [0] * d1  # copies of each old unit placed so far
    for i, s in enumerate(sources):
        if s.kind == COPY and used[s.unit] == 0:
            order[i] = s.unit
            top_units.append(s.unit)
            top_scales.append(s.scale)
            top_shares.append(shares[s.unit][0])
            used[s.unit] = 1
            continue
        row = len(new_rows) + len(pad_rows)
        order[i] = d1 + row
        if s.kind == COPY:
            new_rows.append(row)
            new_units.append(s.unit)
            new_scales.append(s.scale)
            new_shares.append(shares[s.unit][used[s.unit]])
            used[s.unit] += 1
        else:
            pad_rows.append(row)
            if s.kind == MEAN:
                mean_rows.append(row)
    top_e[top_units], top_f[top_units] = torch.tensor(top_scales), torch.tensor(top_shares)
    pads = _paired_noise(len(pad_rows), d1, generator, PAD_NOISE * noise)
    if sparse:  # the same entries as the dense C below, without its (d2 - d1) x d1 zeros
        c_e = _sparse_rows(d2 - d1, d1, new_rows, new_units, new_scales, mean_rows,
                           torch.full((len(mean_rows), d1), 1.0 / d1))
        c_f = _sparse_rows(d2 - d1, d1, new_rows, new_units, new_shares, pad_rows, pads)
        return ExpanderInit(order=torch.tensor(order), top_e=top_e[None], c_e=c_e, top_f=top_f[None], c_f=c_f)
    c_e, c_f = torch.zeros(d2 - d1, d1), torch.zeros(d2 - d1, d1)
    c_e[new_rows, new_units], c_f[new_rows, new_units] = torch.tensor(new_scales), torch.tensor(new_shares)
    c_e[mean_rows] = 1.0 / d1
    c_f[pad_rows] = pads
    return ExpanderInit(order=torch.tensor(order), top_e=top_e[None], c_e=c_e[None], top_f=top_f[None], c_f=c_f[None])


def _sparse_rows(r: int, d1: int, rows: list[int], units: list[int], values: list[float], full_rows: list[int],
                 full: torch.Tensor) -> torch.Tensor:
    """A coalesced sparse (r, d1) C: one entry per (row, unit, value), and whole rows ``full``
    (their non-zero entries) at ``full_rows``; as ``operator.compact`` would store the dense C."""
    values_t = torch.tensor(values, dtype=torch.float32)
    keep = values_t != 0
    at = full.nonzero()
    index = torch.cat([torch.stack([torch.tensor(rows, dtype=torch.long)[keep], torch.tensor(units, dtype=torch.long)[keep]]),
                       torch.stack([torch.tensor(full_rows, dtype=torch.long)[at[:, 0]], at[:, 1]])], dim=1)
    data = torch.cat([values_t[keep], full[at[:, 0], at[:, 1]]])
    return torch.sparse_coo_tensor(index, data, (r, d1), check_invariants=True).coalesce()


def _ensure_coverage(sources: list[Source], d1: int) -> list[Source]:
    """Every old unit needs at least one copy; take spare positions for any that has none."""
    covered = {s.unit for s in sources if s.kind == COPY}
    missing = [j for j in range(d1) if j not in covered]
    if not missing:
        return sources
    seen: set[int] = set()
    spare = []
    for i, s in enumerate(sources):
        if s.kind != COPY or s.unit in seen:
            spare.append(i)
        else:
            seen.add(s.unit)
    for j, i in zip(missing, spare):
        sources[i] = Source(COPY, j)
    return sources


def _random_shares(counts: list[int], generator: torch.Generator, noise: float) -> list[list[float]]:
    """Per old unit, how its copies split the input side: about 1/count each, summing to 1."""
    copied = [c for c in counts if c > 1]
    z = (torch.rand(sum(copied), generator=generator) * 2 - 1) * noise
    owner = torch.repeat_interleave(torch.arange(len(copied)), torch.tensor(copied, dtype=torch.long))
    mean = torch.zeros(len(copied)).index_add_(0, owner, z) / torch.tensor(copied, dtype=torch.float)
    split = ((1 + z - mean[owner]) / torch.tensor(copied, dtype=torch.float)[owner]).tolist()
    shares, at = [], 0
    for c in counts:
        if c <= 1:
            shares.append([1.0] * max(c, 1))
        else:
            shares.append(split[at : at + c])
            at += c
    return shares


def _paired_noise(n: int, d1: int, generator: torch.Generator, noise: float, nonzeros: int = 8) -> torch.Tensor:
    """Rows that cancel in pairs: identical pad units then contribute nothing in sum.

    Each pair reads ``nonzeros`` random old units (as much noise in total as a dense row), so a
    fixed operator applies these rows with a few gathers rather than a matrix product.
    """
    rows = torch.zeros(n, d1)
    pairs, k = n // 2, min(nonzeros, d1)
    if pairs == 0:
        return rows
    units = torch.rand(pairs, d1, generator=generator).argsort(-1)[:, :k]
    half = torch.zeros(pairs, d1).scatter_(1, units, torch.randn(pairs, k, generator=generator) * noise / math.sqrt(k))
    rows[0 : 2 * pairs : 2], rows[1 : 2 * pairs : 2] = half, -half
    return rows


def _stack_layers(inits: list[ExpanderInit]) -> ExpanderInit:
    """One expander per large layer, all with the same placement."""
    if any(not torch.equal(i.order, inits[0].order) for i in inits):
        raise AssertionError("per-layer expanders must share one placement")
    return ExpanderInit(
        order=inits[0].order,
        top_e=torch.cat([i.top_e for i in inits]),
        c_e=torch.cat([i.c_e for i in inits]),
        top_f=torch.cat([i.top_f for i in inits]),
        c_f=torch.cat([i.c_f for i in inits]),
    )


# ---- unit maps per space ---------------------------------------------------------------------

def residual_sources(d1: int, d2: int, norm: str, mode: str, generator: torch.Generator) -> list[Source]:
    if mode == "net2net":
        return [Source(COPY, i) for i in range(d1)] + [
            Source(COPY, int(torch.randint(d1, (1,), generator=generator))) for _ in range(d2 - d1)
        ]
    k = d2 // d1
    pad = MEAN if norm == "layernorm" else ZERO
    return [Source(COPY, i % d1) for i in range(k * d1)] + [Source(pad)] * (d2 - k * d1)


def unit_sources(d1: int, d2: int, mode: str, generator: torch.Generator) -> list[Source]:
    """FFN units: copies in turn (balanced), or random copies for net2net."""
    if mode == "net2net":
        return [Source(COPY, i) for i in range(d1)] + [
            Source(COPY, int(torch.randint(d1, (1,), generator=generator))) for _ in range(d2 - d1)
        ]
    return [Source(COPY, i % d1) for i in range(d2)]


def head_maps(small: dict, large: dict, mode: str, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """Old query head and old KV head behind every new query head and new KV head.

    A new query head must attend through the KV head of its own group, so the query heads of
    new KV group j' are taken from the old group that j' copies, rotating through that group.
    """
    nq, nkv, nq2, nkv2 = small["heads"], small["kv_heads"], large["heads"], large["kv_heads"]
    g, g2 = nq // nkv, nq2 // nkv2
    if mode == "net2net":
        src_kv = list(range(nkv)) + [int(torch.randint(nkv, (1,), generator=generator)) for _ in range(nkv2 - nkv)]
    else:
        src_kv = [j % nkv for j in range(nkv2)]
    src_q = []
    for i in range(nq2):
        j, t = divmod(i, g2)
        turn = j // nkv  # the how-many-th copy of its old group this KV head is
        src_q.append(src_kv[j] * g + (t + g2 * turn) % g)
    return src_q, src_kv


def head_dim_placement(dh: int, dh2: int, rotary: bool) -> list[int]:
    """Where old head dimension p goes in a wider head; rotary pairs (p, p + dh/2) stay paired
    and, for an integer ratio, keep their frequency."""
    if not rotary:
        return list(range(dh))
    half, half2 = dh // 2, dh2 // 2
    m = dh2 // dh if dh2 % dh == 0 else 1
    return [m * p for p in range(half)] + [m * p + half2 for p in range(half)]


def head_sources(src_heads: list[int], dh: int, dh2: int, rotary: bool, scale: float) -> list[Source]:
    place = head_dim_placement(dh, dh2, rotary)
    sources: list[Source] = []
    for old in src_heads:
        block = [Source(ZERO)] * dh2
        for p, pos in enumerate(place):
            block[pos] = Source(COPY, old * dh + p, scale)
        sources.extend(block)
    return sources


# ---- depth ---------------------------------------------------------------------------------

def depth_map(l1: int, l2: int, mode: str) -> list[int]:
    if mode == "stack":
        return [l % l1 for l in range(l2)]
    return [l * l1 // l2 for l in range(l2)]  # interpolate: each layer repeated in place


def silent_layers(l1: int, l2: int, mode: str) -> set[int]:
    """Large layers that repeat an earlier copy of their small layer: with zero block outputs
    (``preserve``) they add nothing to the residual stream at first."""
    src = depth_map(l1, l2, mode)
    return {layer for layer, j in enumerate(src) if src.index(j) != layer}


def _jitter_copies(init: ExpanderInit, generator: torch.Generator, noise: float) -> ExpanderInit:
    """Scale every copied unit's incoming weights by its own factor in [1 - noise / 2, 1 + noise / 2].

    Only for the units of a block whose outputs start at zero, where this is exact. Without it
    such a block's copies never separate: their outputs and so their gradients are identical at
    every step, and the block trains as if it were as narrow as the small model (measured: copies'
    incoming weights at cosine 1.0000000 after 600 AdamW steps).
    """
    def jitter(t: torch.Tensor) -> torch.Tensor:
        return t * (1 + (torch.rand(t.shape, generator=generator) - 0.5) * noise)

    return replace(init, top_e=jitter(init.top_e), c_e=jitter(init.c_e))  # zero entries stay zero


def depth_init(specs: list[TensorSpec], l1: int, l2: int, mode: str, zero_new_outputs: bool) -> dict[str, torch.Tensor]:
    src, silent = depth_map(l1, l2, mode), silent_layers(l1, l2, mode)
    depth = {}
    for spec in specs:
        if not spec.per_layer:
            continue
        w = torch.zeros(l2, l1)
        for layer, j in enumerate(src):
            if not (zero_new_outputs and spec.block_output and layer in silent):
                w[layer, j] = 1.0
        depth[spec.name] = w
    return depth


# ---- whole operator ---------------------------------------------------------------------------

# Where LiGO's depth mixing starts: stacked copies (the reference code and G_stack), each layer
# repeated in place, or zero-output new blocks (exactly function-preserving). Widths always
# start function-preserving. The default is the exact start: in every savings run (GPT-2 and
# BERT, 600 to 1,200 steps, every seed) it trained better after fitting than the stacked one
# (docs/GROWTH.md, "Which start to fit from").
LIGO_INIT_MODES = {  # catalog.LIGO_INITS's choices as (width mode, depth mode, zero outputs of new blocks)
    "stack": ("preserve", "stack", False),
    "interpolate": ("preserve", "interpolate", False),
    "preserve": ("preserve", "interpolate", True),
}

STRATEGY_MODES = {  # the fixed strategies; 'ligo' starts from LIGO_INIT_MODES[ligo_init]
    "preserve": ("preserve", "interpolate", True),
    "stack": ("preserve", "stack", False),
    "interpolate": ("preserve", "interpolate", False),
    "net2net": ("net2net", "stack", False),
}


def build_operator(
    strategy: str,
    family: Family,
    specs: list[TensorSpec],
    small: dict[str, int],
    large: dict[str, int],
    head_tied: bool,
    seed: int = 0,
    noise: float = DEFAULT_NOISE,
    ligo_init: str = DEFAULT_LIGO_INIT,
    spread: float | None = None,
    planned: bool = False,
) -> GrowthOperator:
    """The initial operator for a strategy; ``small``/``large`` are ``sizes_of`` dicts.

    ``planned``: a fixed operator kept as row plans (``PlannedExpander``), whose memory grows with
    the number of units rather than with their square; it cannot be fitted."""
    check_growth_options(strategy, ligo_init, noise, spread)
    width, depth_mode, zero_new = LIGO_INIT_MODES[ligo_init] if strategy == "ligo" else STRATEGY_MODES[strategy]
    spread = default_spread(strategy) if spread is None else spread
    if width == "net2net":
        noise = spread = 0.0  # bert2BERT as published: exact copies, inputs divided evenly
    g = torch.Generator().manual_seed(seed)
    dh, dh2 = small["head_dim"], large["head_dim"]
    q_scale = math.sqrt(dh2 / dh)  # keeps q.k / sqrt(head_dim) when heads get wider
    l2 = large["layers"]

    # Separating copies after growth moves the residual stream's copies by equal and opposite
    # amounts; a norm's mean and variance see them cancel only if the readers' shares are even too.
    res = _expander_from_sources(
        residual_sources(small["hidden"], large["hidden"], family.norm, width, g), small["hidden"], g, noise,
        even_shares=spread > 0,
    )
    expanders = {"res": res}
    per_layer = {"q": [], "k": [], "v": [], "ffn": []}
    src_q, src_kv = head_maps(small, large, width, g)  # one head map: every layer keeps one placement
    for _ in range(l2):
        per_layer["q"].append(head_sources(src_q, dh, dh2, family.rotary, q_scale))
        per_layer["k"].append(head_sources(src_kv, dh, dh2, family.rotary, 1.0))
        per_layer["v"].append(head_sources(src_kv, dh, dh2, family.rotary, 1.0))
        per_layer["ffn"].append(unit_sources(small["ffn"], large["ffn"], width, g))
    small_dims = {
        "res": small["hidden"], "q": small["heads"] * dh, "k": small["kv_heads"] * dh,
        "v": small["kv_heads"] * dh, "ffn": small["ffn"],
    }
    silent = silent_layers(small["layers"], l2, depth_mode) if zero_new else set()
    # ``planned``: each layer's C is made sparse as soon as it is drawn (the same draws, in the same order).
    keep = compact if planned else (lambda init: init)
    for space, layers in per_layer.items():
        inits = [_expander_from_sources(s, small_dims[space], g, noise, sparse=planned) for s in layers]
        for layer in sorted(silent):  # a fixed order of random draws, not a set's
            inits[layer] = keep(_jitter_copies(dense(inits[layer]) if planned else inits[layer], g, noise))
        expanders[space] = PlannedExpander(inits) if planned else _stack_layers(inits)
    if planned:
        expanders["res"] = PlannedExpander([compact(res)])

    if width == "net2net":
        norm_scale = 1.0
    else:
        k = large["hidden"] // small["hidden"]
        norm_scale = math.sqrt(k * small["hidden"] / large["hidden"])
    return GrowthOperator(
        family=family,
        specs=specs,
        expanders=expanders,
        depth=depth_init(specs, small["layers"], l2, depth_mode, zero_new),
        norm_scale=norm_scale,
        head_tied=head_tied,
        small_dims=small_dims,
        large_layers=l2,
        noise=noise,
        spread=spread,
    )
