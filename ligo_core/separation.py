"""Move copied units apart after growth, keeping the function to first order.

Growth makes every new unit a copy of an old one. Copies that feed the same readers get gradients
that differ only by their input shares, AdamW's step ignores that scale, and so they separate
slowly: measured on the savings GPT-2, live blocks' FFN copies were still at cosine 0.955 after
600 steps (unrelated units: 0.18), so the grown model trained as if it were much narrower.

For two copies ``a``, ``b`` of one unit that the readers sum with shares ``s_a``, ``s_b``, moving
their incoming weights by ``+s_b d`` and ``-s_a d`` leaves ``s_a f(w_a) + s_b f(w_b)`` equal to
``f(w)`` up to second order in ``d``, whatever the unit's function ``f`` is, and exactly where ``f``
is linear. ``d`` is a random direction as long as ``spread / 2`` times the unit's incoming weights.

Only spaces whose units are read through their own input-side shares take it: the residual stream
and the FFN units. Attention heads are left alone (their copies are read through the attention
scores, not a share-weighted sum); so are vectors (biases, norm gains). Copied heads part in
training without help: their shares differ unit by unit, so their gradients differ in direction,
not only in scale (measured on the savings GPT-2: value copies at cosine 0.58 and query copies at
0.72 after 600 steps; moving the values apart as well, exactly, changed the loss by 0.0003).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from ligo_core.operator import GrowthOperator, stored_axis

SEPARATED_SPACES = ("res", "ffn")


@dataclass(frozen=True)
class CopyPairs:
    """Pairs of large positions that copy one small unit (the first copy with each other one),
    with each side's input share per large layer (one row for a global space)."""

    a: torch.Tensor  # (P,) long
    b: torch.Tensor  # (P,) long
    share_a: torch.Tensor  # (L, P)
    share_b: torch.Tensor  # (L, P)


def copy_pairs(operator: GrowthOperator) -> dict[str, CopyPairs]:
    """The copies of every separable space, read off the operator before it is fitted."""
    pairs = {}
    for space in SEPARATED_SPACES:
        expander = operator.expanders[space]
        writes, reads = expander.row_plan("E"), expander.row_plan("F")
        not_copies = torch.cat([writes.mean_rows, writes.sparse_rows, writes.dense_rows]).tolist()
        copy = (writes.scale != 0).all(0)  # zero pads are "copies" scaled by 0
        copy[not_copies] = False
        groups: dict[int, list[int]] = {}
        for position in copy.nonzero().flatten().tolist():
            groups.setdefault(int(writes.src[0, position]), []).append(position)
        a = [g[0] for g in groups.values() for _ in g[1:]]
        b = [p for g in groups.values() for p in g[1:]]
        if b:
            a_t, b_t = torch.tensor(a), torch.tensor(b)
            pairs[space] = CopyPairs(a_t, b_t, reads.scale[:, a_t].float().cpu(), reads.scale[:, b_t].float().cpu())
    return pairs


@torch.no_grad()
def separation_offsets(
    state: Callable[[str], torch.Tensor] | dict[str, torch.Tensor],
    operator: GrowthOperator,
    names: dict[str, str],
    spread: float,
    generator: torch.Generator,
) -> LazyOffsets:
    """What the paired moves add to each moved matrix of the grown model (``state``: large name ->
    tensor, from the operator before fitting; a dict, or a function that makes one tensor at a
    time). LiGO's fit trains the operator with them added, so it fits the model that is handed
    over; the fixed strategies just add them.

    The answer is a mapping that makes each offset when it is read, from a few numbers kept per
    tensor (the random state its directions were drawn from, its copies' row norms): the offsets
    of a large model are about as big as its matrices, and never all alive at once."""
    get = state.__getitem__ if isinstance(state, dict) else state
    pairs = copy_pairs(operator) if spread > 0 else {}
    moves: dict[str, list[_Move]] = {}
    shapes: dict[str, tuple[torch.Size, torch.dtype, torch.device]] = {}
    for spec in operator.specs:
        for k, dim in enumerate(spec.dims):
            if dim is None or dim[0] not in pairs or operator._side(dim[1]) != "E" or len(spec.dims) != 2:
                continue
            axis = stored_axis(spec, k, 2)
            full = names[spec.name]
            tensors = [full.format(i=layer) for layer in range(operator.large_layers)] if spec.per_layer else [full]
            for layer, name in enumerate(tensors):
                weight = get(name)
                shapes[name] = (weight.shape, weight.dtype, weight.device)
                move = _Move(axis, pairs[dim[0]], layer, spread, _pair_norms(weight, axis, pairs[dim[0]], layer),
                             generator.get_state())
                torch.randn(move.norms.shape[0], weight.numel() // weight.shape[axis], generator=generator)  # drawn
                moves.setdefault(name, []).append(move)
                del weight
    return LazyOffsets(moves, shapes)


@dataclass(frozen=True)
class _Move:
    """One set of paired moves of a tensor along ``axis``: its directions are drawn from ``rng``."""

    axis: int
    pairs: CopyPairs
    layer: int
    spread: float
    norms: torch.Tensor  # (P, 1): the row norms of the first copies (the pairs' ``a``) it moves
    rng: torch.Tensor  # the generator's state before the directions were drawn


class LazyOffsets(Mapping):
    """Large name -> offset tensor, made when read (the same numbers every time)."""

    def __init__(self, moves: dict[str, list[_Move]], shapes: dict[str, tuple]):
        self._moves, self._shapes = moves, shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        shape, dtype, device = self._shapes[name]
        offset = torch.zeros(shape, dtype=dtype, device=device)
        for move in self._moves[name]:
            _add_moves(offset, move, torch.Generator().set_state(move.rng))
        return offset

    def __iter__(self) -> Iterator[str]:
        return iter(self._moves)

    def __len__(self) -> int:
        return len(self._moves)


def _usable(pairs: CopyPairs, layer: int):
    row = layer if pairs.share_a.shape[0] > 1 else 0
    s_a, s_b = pairs.share_a[row], pairs.share_b[row]
    total = s_a + s_b
    usable = total != 0
    return usable, s_a[usable], s_b[usable], total[usable]


def _pair_norms(weight: torch.Tensor, axis: int, pairs: CopyPairs, layer: int) -> torch.Tensor:
    usable = _usable(pairs, layer)[0]
    a = pairs.a[usable].to(weight.device)
    own = weight.movedim(axis, 0)[a].reshape(len(a), -1).float().cpu()
    return own.norm(dim=1, keepdim=True)


def _add_moves(offset: torch.Tensor, move: _Move, generator: torch.Generator) -> None:
    """Add to ``offset`` the moves of its tensor's copied units along ``move.axis``."""
    usable, s_a, s_b, total = _usable(move.pairs, move.layer)
    a, b = move.pairs.a[usable].to(offset.device), move.pairs.b[usable].to(offset.device)
    moves = offset.movedim(move.axis, 0)  # a view: writes land in ``offset``
    direction = torch.randn(len(a), moves[0].numel(), generator=generator)
    direction *= move.norms / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
    shape = (-1,) + tuple(moves.shape[1:])
    step_a = ((move.spread * s_b / total)[:, None] * direction).reshape(shape)
    step_b = ((move.spread * s_a / total)[:, None] * direction).reshape(shape)
    moves.index_add_(0, a, step_a.to(moves))
    moves.index_add_(0, b, -step_b.to(moves))
