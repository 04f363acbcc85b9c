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
from ligo_core.operator import ExpanderInit, GrowthOperator, PlannedExpander, compact

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


@dataclass(frozen=True)
class _Walk:
    """Where every large unit of a space comes from, as index tensors: worked out once for a list
    of sources and shared by every layer that has the same list (only the random draws differ)."""

    d1: int
    order: torch.Tensor  # (d2,) final row i = stacked row order[i]
    top_units: torch.Tensor  # old units that keep their own row (their first copy)
    top_scales: torch.Tensor
    new_rows: torch.Tensor  # rows of C that copy an old unit (its second, third... copy)
    new_units: torch.Tensor
    new_scales: torch.Tensor
    mean_rows: list[int]  # rows of C that are mean pads
    pad_rows: list[int]  # rows of C that are pads (mean or zero): paired noise on the input side
    counts: torch.Tensor  # (d1,) copies of each old unit
    top_slot: torch.Tensor  # each top unit's share, as an index into ``_random_shares``' answer
    new_slot: torch.Tensor

    @staticmethod
    def of(sources: list[Source], d1: int) -> _Walk:
        """The walk over units is plain Python collecting indices, once per distinct list: the
        tensors are filled in bulk (element-wise tensor writes made this the slowest part of
        growing a 355M model)."""
        sources = _ensure_coverage(list(sources), d1)
        counts = [0] * d1
        for s in sources:
            if s.kind == COPY:
                counts[s.unit] += 1
        first = [0] * d1  # each old unit's first share slot: its copies' shares are consecutive
        at = 0
        for unit, c in enumerate(counts):
            first[unit], at = at, at + max(c, 1)
        order = [0] * len(sources)
        top_units, top_scales, top_slot = [], [], []
        new_rows, new_units, new_scales, new_slot, mean_rows, pad_rows = [], [], [], [], [], []
        used = [0] * d1  # copies of each old unit placed so far
        for i, s in enumerate(sources):
            if s.kind == COPY and used[s.unit] == 0:
                order[i] = s.unit
                top_units.append(s.unit)
                top_scales.append(s.scale)
                top_slot.append(first[s.unit])
                used[s.unit] = 1
                continue
            row = len(new_rows) + len(pad_rows)
            order[i] = d1 + row
            if s.kind == COPY:
                new_rows.append(row)
                new_units.append(s.unit)
                new_scales.append(s.scale)
                new_slot.append(first[s.unit] + used[s.unit])
                used[s.unit] += 1
            else:
                pad_rows.append(row)
                if s.kind == MEAN:
                    mean_rows.append(row)
        long = torch.long
        return _Walk(d1, torch.tensor(order), torch.tensor(top_units, dtype=long), torch.tensor(top_scales),
                     torch.tensor(new_rows, dtype=long), torch.tensor(new_units, dtype=long),
                     torch.tensor(new_scales), mean_rows, pad_rows, torch.tensor(counts, dtype=long),
                     torch.tensor(top_slot, dtype=long), torch.tensor(new_slot, dtype=long))


def _expander_from_sources(sources: list[Source] | _Walk, d1: int, generator: torch.Generator, noise: float,
                           even_shares: bool = False, sparse: bool = False) -> ExpanderInit:
    """Build ``P [diag(top); C]`` for E, and the matching input side F with ``F^T E = I``.

    ``sources``: a list, or its ``_Walk`` (for many layers with the same list).
    ``even_shares``: copies split the input side evenly (``noise`` then only reaches the pads).
    ``sparse``: C comes back as a coalesced sparse (r, d1) tensor (``operator.compact``'s layout).
    """
    walk = sources if isinstance(sources, _Walk) else _Walk.of(sources, d1)
    d2 = len(walk.order)
    shares = _random_shares(walk.counts, generator, 0.0 if even_shares else noise)
    top_e, top_f = torch.ones(d1), torch.ones(d1)
    top_e[walk.top_units], top_f[walk.top_units] = walk.top_scales, shares[walk.top_slot]
    new_shares = shares[walk.new_slot]
    pad_row, pad_unit, pad_value = _paired_noise(len(walk.pad_rows), d1, generator, PAD_NOISE * noise)
    pad_row = torch.tensor(walk.pad_rows, dtype=torch.long)[pad_row]  # C's rows
    mean_row = torch.tensor(walk.mean_rows, dtype=torch.long).repeat_interleave(d1)
    mean_unit = torch.arange(d1).repeat(len(walk.mean_rows))
    if sparse:  # the same entries as the dense C below, without its (d2 - d1) x d1 zeros
        c_e = _sparse_rows(d2 - d1, d1, torch.cat([walk.new_rows, mean_row]), torch.cat([walk.new_units, mean_unit]),
                           torch.cat([walk.new_scales, torch.full((len(mean_row),), 1.0 / d1)]))
        c_f = _sparse_rows(d2 - d1, d1, torch.cat([walk.new_rows, pad_row]), torch.cat([walk.new_units, pad_unit]),
                           torch.cat([new_shares, pad_value]))
        return ExpanderInit(order=walk.order, top_e=top_e[None], c_e=c_e, top_f=top_f[None], c_f=c_f)
    c_e, c_f = torch.zeros(d2 - d1, d1), torch.zeros(d2 - d1, d1)
    c_e[walk.new_rows, walk.new_units], c_f[walk.new_rows, walk.new_units] = walk.new_scales, new_shares
    c_e[mean_row, mean_unit] = 1.0 / d1
    c_f[pad_row, pad_unit] = pad_value
    return ExpanderInit(order=walk.order, top_e=top_e[None], c_e=c_e[None], top_f=top_f[None], c_f=c_f[None])


def _sparse_rows(r: int, d1: int, rows: torch.Tensor, units: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A coalesced sparse (r, d1) C from its (row, unit, value) entries, zeros left out: as
    ``operator.compact`` would store the dense C."""
    values = values.float()
    keep = values != 0
    return torch.sparse_coo_tensor(torch.stack([rows[keep], units[keep]]), values[keep], (r, d1),
                                   check_invariants=False).coalesce()  # built valid: no check


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


def _random_shares(counts: torch.Tensor, generator: torch.Generator, noise: float) -> torch.Tensor:
    """How each old unit's copies split the input side: about 1/count each, summing to 1. One flat
    tensor, each unit's copies in a run (``_Walk``'s slots); a unit with no copy or one has 1."""
    slots = counts.clamp_min(1)
    copied = counts[counts > 1]
    z = (torch.rand(int(copied.sum()), generator=generator) * 2 - 1) * noise
    owner = torch.repeat_interleave(torch.arange(len(copied)), copied)
    mean = torch.zeros(len(copied)).index_add_(0, owner, z) / copied.float()
    split = (1 + z - mean[owner]) / copied.float()[owner]
    shares = torch.ones(int(slots.sum()))
    shares[torch.repeat_interleave(counts > 1, slots)] = split
    return shares


def _paired_noise(n: int, d1: int, generator: torch.Generator, noise: float,
                  nonzeros: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows that cancel in pairs: identical pad units then contribute nothing in sum. Returned as
    entries (row in [0, n), old unit, value).

    Each pair reads ``nonzeros`` random old units, one in each of as many equal strata of the units
    (so they are distinct, drawn without a sort of ``d1`` numbers per row), with as much noise in
    total as a dense row; a fixed operator applies these rows with a few gathers rather than a
    matrix product.
    """
    pairs, k = n // 2, min(nonzeros, d1)
    if pairs == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0)
    stride = d1 // k
    units = (torch.randint(stride, (pairs, k), generator=generator) + torch.arange(k) * stride).flatten()
    values = (torch.randn(pairs, k, generator=generator) * noise / math.sqrt(k)).flatten()
    rows = torch.arange(pairs).repeat_interleave(k) * 2
    return torch.cat([rows, rows + 1]), torch.cat([units, units]), torch.cat([values, -values])


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
    def factors(n: int) -> torch.Tensor:
        return 1 + (torch.rand(n, generator=generator) - 0.5) * noise

    top_e = init.top_e * factors(init.top_e.shape[-1])
    rows = factors(init.c_e.shape[-2])  # one per row of C: a copy's row holds its one entry
    if init.c_e.is_sparse:  # ``compact``'s layout: scale the stored entries, zeros stay zeros
        c_e = torch.sparse_coo_tensor(init.c_e.indices(), init.c_e.values() * rows[init.c_e.indices()[0]],
                                      init.c_e.shape, check_invariants=False).coalesce()
    else:
        c_e = init.c_e * rows[:, None]
    return replace(init, top_e=top_e, c_e=c_e)


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
    q_sources = head_sources(src_q, dh, dh2, family.rotary, q_scale)
    kv_sources = head_sources(src_kv, dh, dh2, family.rotary, 1.0)
    ffn_sources = None if width == "net2net" else unit_sources(small["ffn"], large["ffn"], width, g)
    for _ in range(l2):  # the same list object for every layer, so its walk is worked out once
        per_layer["q"].append(q_sources)
        per_layer["k"].append(kv_sources)
        per_layer["v"].append(kv_sources)
        per_layer["ffn"].append(ffn_sources or unit_sources(small["ffn"], large["ffn"], width, g))
    small_dims = {
        "res": small["hidden"], "q": small["heads"] * dh, "k": small["kv_heads"] * dh,
        "v": small["kv_heads"] * dh, "ffn": small["ffn"],
    }
    silent = silent_layers(small["layers"], l2, depth_mode) if zero_new else set()
    for space, layers in per_layer.items():
        walks: dict[int, _Walk] = {}  # layers with the same sources (all, unless net2net) share one walk
        for sources in layers:
            if id(sources) not in walks:
                walks[id(sources)] = _Walk.of(sources, small_dims[space])
        inits = [_expander_from_sources(walks[id(s)], small_dims[space], g, noise, sparse=planned) for s in layers]
        for layer in sorted(silent):  # a fixed order of random draws, not a set's
            inits[layer] = _jitter_copies(inits[layer], g, noise)
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
