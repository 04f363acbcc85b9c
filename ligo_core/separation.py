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


# Elements of a move's random directions drawn at once: bounds the memory of moving a large
# tensor's copies (an 8B model's embedding has 2048 copied columns of 128k entries), and keeps
# the several passes over each piece within the CPU's caches.
MOVE_CHUNK = 2**24


def moved_axis(operator: GrowthOperator, spec, pairs: dict[str, CopyPairs]) -> tuple[int, str] | None:
    """The stored axis of ``spec``'s tensors whose copied units are moved apart, and its space."""
    found = [(stored_axis(spec, k, 2), dim[0]) for k, dim in enumerate(spec.dims)
             if dim is not None and dim[0] in pairs and operator._side(dim[1]) == "E" and len(spec.dims) == 2]
    if len(found) > 1:  # the draws' order would depend on the loop order; no family has such a tensor
        raise AssertionError(f"{spec.name}: more than one moved axis")
    return found[0] if found else None


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
    over; the fixed strategies just add them (``move_apart``, one tensor at a time, draws the same
    numbers in the same order).

    The answer is a mapping that makes each offset when it is read, from a few numbers kept per
    tensor (the random state its directions were drawn from, its copies' row norms): the offsets
    of a large model are about as big as its matrices, and are never all alive at once."""
    get = state.__getitem__ if isinstance(state, dict) else state
    pairs = copy_pairs(operator) if spread > 0 else {}
    moves: dict[str, _Move] = {}
    for spec in operator.specs:
        moved = moved_axis(operator, spec, pairs)
        if moved is None:
            continue
        axis, space = moved
        full = names[spec.name]
        tensors = [full.format(i=layer) for layer in range(operator.large_layers)] if spec.per_layer else [full]
        for layer, name in enumerate(tensors):
            weight = get(name)
            move = _Move(axis, pairs[space], layer, spread, _pair_norms(weight, axis, pairs[space], layer),
                         generator.get_state(), weight.shape, weight.dtype, weight.device)
            move.skip(generator)  # the next tensor's draws start where they did when the moves were made
            moves[name] = move
            del weight
    return LazyOffsets(moves)


@torch.no_grad()
def move_apart(weight: torch.Tensor, spec, layer: int, operator: GrowthOperator, pairs: dict[str, CopyPairs],
               spread: float, generator: torch.Generator) -> torch.Tensor:
    """``weight`` (one grown tensor, from the operator before fitting) with its copies moved apart, in
    place: equal to ``weight + separation_offsets(...)[name]`` when called for every tensor in spec
    order with the same generator, without an offset tensor as large as the weight."""
    moved = moved_axis(operator, spec, pairs) if spread > 0 else None
    if moved is not None:
        axis, space = moved
        move = _Move(axis, pairs[space], layer, spread, _pair_norms(weight, axis, pairs[space], layer),
                     None, weight.shape, weight.dtype, weight.device)
        move.add_to(weight, generator)
    return weight


@dataclass(frozen=True)
class _Move:
    """The paired moves of one tensor's copied units along ``axis``."""

    axis: int
    pairs: CopyPairs
    layer: int
    spread: float
    norms: torch.Tensor  # (P, 1): the row norms of the first copies (the pairs' usable ``a``)
    rng: torch.Tensor | None  # the generator's state before the directions were drawn
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    def add_to(self, weight: torch.Tensor, generator: torch.Generator) -> None:
        for rows, step, sign in self.steps(generator):
            # along ``axis`` itself: an index_add_ into a moved-axis view is ~4x slower
            weight.index_add_(self.axis, rows.to(weight.device), step.movedim(0, self.axis).to(weight), alpha=sign)

    @property
    def unit_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[:self.axis] + self.shape[self.axis + 1:])

    def skip(self, generator: torch.Generator) -> None:
        """Draw from ``generator`` exactly what ``steps`` draws, without making the moves."""
        a = self.pairs.a[_usable(self.pairs, self.layer)[0]]
        for start, end in _chunks(a, self.unit_shape):
            torch.randn((end - start, _numel(self.unit_shape)), generator=generator)

    def steps(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """(rows, step, sign) to add along the moved axis, a chunk of whole copy groups at a time. A
        first copy's moves are summed before they are yielded, so adding them to the weight gives
        the same bits as adding a zero-started offset that gathered them."""
        usable, s_a, s_b, total = _usable(self.pairs, self.layer)
        a, b = self.pairs.a[usable], self.pairs.b[usable]
        unit_shape = self.unit_shape
        for start, end in _chunks(a, unit_shape):
            ca, cb = a[start:end], b[start:end]
            direction = torch.randn((len(ca), _numel(unit_shape)), generator=generator)
            direction *= self.norms[start:end] / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
            step_a = ((self.spread * s_b[start:end] / total[start:end])[:, None] * direction).reshape((-1,) + unit_shape)
            step_b = ((self.spread * s_a[start:end] / total[start:end])[:, None] * direction).reshape((-1,) + unit_shape)
            first, slot = torch.unique_consecutive(ca, return_inverse=True)
            if len(first) == len(ca):  # one pair per first copy (two copies a unit): nothing to gather
                yield ca, step_a, 1
            else:
                gathered = torch.zeros((len(first),) + unit_shape, dtype=step_a.dtype)
                gathered.index_add_(0, slot, step_a)
                yield first, gathered, 1
            yield cb, step_b, -1  # adding -1 x step: the same bits as adding -step


class LazyOffsets(Mapping):
    """Large name -> offset tensor, made when read (the same numbers every time)."""

    def __init__(self, moves: dict[str, _Move]):
        self._moves = moves

    def __getitem__(self, name: str) -> torch.Tensor:
        move = self._moves[name]
        offset = torch.zeros(move.shape, dtype=move.dtype, device=move.device)
        move.add_to(offset, torch.Generator().set_state(move.rng))
        return offset

    def __iter__(self) -> Iterator[str]:
        return iter(self._moves)

    def __len__(self) -> int:
        return len(self._moves)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _usable(pairs: CopyPairs, layer: int):
    """The pairs whose unit is read at all (shares summing to non-zero), with their shares."""
    row = layer if pairs.share_a.shape[0] > 1 else 0
    s_a, s_b = pairs.share_a[row], pairs.share_b[row]
    total = s_a + s_b
    usable = total != 0
    return usable, s_a[usable], s_b[usable], total[usable]


def _chunks(a: torch.Tensor, unit_shape: tuple[int, ...]) -> Iterator[tuple[int, int]]:
    """Pieces of the pairs, each holding whole copy groups and about MOVE_CHUNK elements. Random
    draws split into pieces give the same numbers as one draw when every piece holds a multiple
    of 16 elements (torch's CPU normal fills 16 at a time); else one piece."""
    width = _numel(unit_shape) or 1
    step_rows = max(1, MOVE_CHUNK // width) if width % 16 == 0 else max(len(a), 1)
    start = 0
    while start < len(a):
        end = min(start + step_rows, len(a))
        while end < len(a) and a[end] == a[end - 1]:  # a copy group stays in one chunk
            end += 1
        yield start, end
        start = end


def _pair_norms(weight: torch.Tensor, axis: int, pairs: CopyPairs, layer: int) -> torch.Tensor:
    """(P, 1): the row norms of the usable pairs' first copies, read a chunk at a time."""
    usable = _usable(pairs, layer)[0]
    a = pairs.a[usable]
    units = weight.movedim(axis, 0)
    norms = [units[a[start:end].to(weight.device)].reshape(end - start, -1).float().norm(dim=1, keepdim=True).cpu()
             for start, end in _chunks(a, tuple(units.shape[1:]))]
    return torch.cat(norms) if norms else torch.zeros(0, 1)
