"""Move copied units apart after growth, keeping the function to first order.

Growth makes every new unit a copy of an old one. Copies that feed the same readers get gradients
that differ only by their input shares, AdamW's step ignores that scale, and so they separate
slowly: measured on the savings GPT-2, live blocks' FFN copies were still at cosine 0.955 after
600 steps (unrelated units: 0.18), so the grown model trained as if it were much narrower.

For two copies ``a``, ``b`` of one unit that the readers sum with shares ``s_a``, ``s_b``, moving
their incoming weights by ``+s_b d`` and ``-s_a d`` leaves ``s_a f(w_a) + s_b f(w_b)`` equal to
``f(w)`` up to second order in ``d``, whatever the unit's function ``f`` is, and exactly where ``f``
is linear. ``d`` is a random direction as long as ``spread / 2`` times the unit's incoming weights
(a window of one pool of normals, see ``POOL``).

Only spaces whose units are read through their own input-side shares take it: the residual stream
and the FFN units. Attention heads are left alone (their copies are read through the attention
scores, not a share-weighted sum); so are vectors (biases, norm gains). Copied heads part in
training without help: their shares differ unit by unit, so their gradients differ in direction,
not only in scale (measured on the savings GPT-2: value copies at cosine 0.58 and query copies at
0.72 after 600 steps; moving the values apart as well, exactly, changed the loss by 0.0003).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from ligo_core.families import TensorSpec
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


# Elements of a move's steps made at once where copies are not in runs (``_Move``): bounds the
# memory of moving a large tensor's copies (an 8B model's embedding has 2048 copied columns of 128k
# entries).
MOVE_CHUNK = 2**24
# Elements of a run of moved units handled at once: small enough to stay in the CPU's cache.
MOVE_BLOCK = 2**18
# Every direction is a window of one pool of standard normals: drawing a normal costs about as much
# as the rest of a streamed grow's work per element (3B of them for 1B -> 8B), a window costs
# nothing (a view). A window of i.i.d. normals is an isotropic random direction; windows of one
# group are disjoint, and windows at different starts are uncorrelated, as separate draws would be.
POOL = 2**23


def moved_axis(operator: GrowthOperator, spec, pairs: dict[str, CopyPairs]) -> tuple[int, str] | None:
    """The stored axis of ``spec``'s tensors whose copied units are moved apart, and its space."""
    found = [(stored_axis(spec, k, 2), dim[0]) for k, dim in enumerate(spec.dims)
             if dim is not None and dim[0] in pairs and operator._side(dim[1]) == "E" and len(spec.dims) == 2]
    if len(found) > 1:  # the draws' order would depend on the loop order; no family has such a tensor
        raise AssertionError(f"{spec.name}: more than one moved axis")
    return found[0] if found else None


class Separation:
    """The moves of one grown model, drawn from ``generator`` tensor by tensor in spec order: a fixed
    strategy adds them to each tensor's blocks as it is made (``block_moves``, ligo_core/rowblocks.py)
    or to a whole tensor (``move``); LiGO's fit takes them all as offsets (``offsets``). Each way
    draws the same numbers."""

    def __init__(self, operator: GrowthOperator, spread: float, generator: torch.Generator):
        self.operator, self.spread, self.generator = operator, spread, generator
        self.pairs = copy_pairs(operator) if spread > 0 else {}
        self._pool: torch.Tensor | None = None
        self._cast_pools: dict[tuple, torch.Tensor] = {}  # the pool in a block's (dtype, device), cast once
        self._squares: torch.Tensor | None = None  # running sums of the pool's squares, for window norms

    @torch.no_grad()
    def plan(self, weight: torch.Tensor, spec, layer: int) -> BlockMoves | _Move | None:
        """Draw the moves of one tensor (``weight``: as grown, before moving): None if it has none."""
        runs = self._runs(spec, layer)
        draw = self._draw(spec, layer, weight.shape)
        if draw is None:
            return None
        norms = _pair_norms(weight, draw.axis, draw.a)
        if runs is not None:  # the layout of every fixed strategy: added by blocks of rows
            return self._block_moves(draw, runs, norms)
        reach = norms / draw.window_norms
        return _Move(draw.axis, draw.a, draw.b, draw.starts, draw.length, draw.share_a * reach, draw.share_b * reach,
                     self._pool)

    @torch.no_grad()
    def block_moves(self, spec, layer: int, shape: torch.Size) -> BlockMoves | None:
        """The moves of one tensor of ``shape`` drawn as ``plan`` draws them, to be added a block of
        rows at a time while the tensor is made (ligo_core/rowblocks.py), the first copies' norms
        taken as their rows are made; None if it has none. Only for copies laid out in runs
        (``_runs``); else ``ValueError``, before any draw."""
        if self._draw_spec(spec) is None:
            return None
        runs = self._runs(spec, layer)
        if runs is None:
            raise ValueError(f"{spec.name}: copies not in two runs, first copies first")
        return self._block_moves(self._draw(spec, layer, shape), runs)

    def _block_moves(self, draw: _Draw, runs: tuple[int, int], norms: torch.Tensor | None = None) -> BlockMoves:
        return BlockMoves(draw.axis, *runs, len(draw.a), draw.starts, draw.length, draw.window_norms, draw.share_a,
                          draw.share_b, self._pool, draw.group, self._cast_pools, norms)

    def _draw_spec(self, spec) -> tuple[int, str] | None:
        return moved_axis(self.operator, spec, self.pairs) if self.spread > 0 else None

    def _runs(self, spec, layer: int) -> tuple[int, int] | None:
        """(first of ``a``, first of ``b``) when the usable pairs' first copies are one run of
        consecutive units and their copies another after it; else None."""
        moved = self._draw_spec(spec)
        if moved is None:
            return None
        pairs = self.pairs[moved[1]]
        usable = _usable(pairs, layer)[0]
        a_start, b_start = _run_start(pairs.a[usable]), _run_start(pairs.b[usable])
        if a_start is None or b_start is None or b_start < a_start + int(usable.sum()):
            return None
        return a_start, b_start

    def _draw(self, spec, layer: int, shape: torch.Size) -> _Draw | None:
        moved = self._draw_spec(spec)
        if moved is None:
            return None
        axis, space = moved
        pairs = self.pairs[space]
        usable, s_a, s_b, total = _usable(pairs, layer)
        count, length = int(usable.sum()), _numel(shape) // shape[axis]  # pairs, elements a unit
        # Units that are rows take a window each; units that are columns take, row by row, a window
        # across the pairs: either way each unit's direction is i.i.d. normals, read as whole rows.
        width, windows = (length, count) if axis == 0 else (count, length)
        if width > POOL // 2:
            raise AssertionError(f"{spec.name}: windows of {width} elements, longer than the direction pool allows")
        pool, squares = self._draw_pool()
        # Windows come in groups of consecutive, disjoint windows at one random start per group, so
        # a run of them is one slice of the pool (no gather); groups take at most half the pool.
        group = max(1, (POOL // 2) // width)
        bases = torch.randint(POOL - group * width + 1, (-(-windows // group),), generator=self.generator)
        within = torch.arange(windows) % group
        starts = bases.repeat_interleave(group)[:windows] + within * width
        if axis == 0:
            window_norms = (squares[starts + width] - squares[starts]).sqrt().float()
        else:
            window_norms = _across_norms(pool, starts, width, group)
        return _Draw(axis, pairs.a[usable], pairs.b[usable], starts, length, window_norms.clamp_min(1e-12),
                     self.spread * s_b / total, self.spread * s_a / total, group)

    @torch.no_grad()
    def offsets(self, state: Callable[[str], torch.Tensor] | dict[str, torch.Tensor],
                names: dict[str, str]) -> LazyOffsets:
        """Every tensor's moves, drawn in spec order, as offsets (``separation_offsets``)."""
        get = state.__getitem__ if isinstance(state, dict) else state
        moves: dict[str, tuple[BlockMoves | _Move, torch.Size, torch.dtype, torch.device]] = {}
        for spec, layer, name in self._moved_tensors(names):
            weight = get(name)
            moves[name] = (self.plan(weight, spec, layer), weight.shape, weight.dtype, weight.device)
            del weight
        return LazyOffsets(moves)

    def _moved_tensors(self, names: dict[str, str]) -> Iterator[tuple[TensorSpec, int, str]]:
        for spec in self.operator.specs:
            if self.spread <= 0 or moved_axis(self.operator, spec, self.pairs) is None:
                continue
            full = names[spec.name]
            for layer in range(self.operator.large_layers) if spec.per_layer else [0]:
                yield spec, layer, full.format(i=layer) if spec.per_layer else full

    @torch.no_grad()
    def move(self, weight: torch.Tensor, spec, layer: int) -> torch.Tensor:
        """``weight`` with its copies moved apart, in place."""
        move = self.plan(weight, spec, layer)
        if move is not None:
            move.add_to(weight)
        return weight

    def _draw_pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pool is None:
            self._pool = torch.randn(POOL, generator=self.generator)
            self._squares = torch.cat([torch.zeros(1, dtype=torch.float64),
                                       self._pool.double().square().cumsum(0)])
        return self._pool, self._squares


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
    over; the fixed strategies move each tensor in place as it is made instead (``Separation.move``
    draws the same numbers in the same order).

    The answer is a mapping that makes each offset when it is read, from a few numbers kept per
    pair (its window's start and its two step sizes): the offsets of a large model are about as
    big as its matrices, and are never all alive at once."""
    return Separation(operator, spread, generator).offsets(state, names)


@dataclass(frozen=True)
class _Draw:
    """What ``Separation`` draws for one tensor: its usable pairs (first copies ``a``, copies ``b``,
    units along ``axis``), each direction's window start, the windows' norms, and each side's share
    of the step: a step is (spread x the other side's share) x (the first copy's norm / its
    window's norm)."""

    axis: int
    a: torch.Tensor  # (P,) long
    b: torch.Tensor
    starts: torch.Tensor  # (P,) for units that are rows, (rows,) for units that are columns
    length: int  # elements of one unit
    window_norms: torch.Tensor  # (P,)
    share_a: torch.Tensor  # (P,): spread x s_b / (s_a + s_b)
    share_b: torch.Tensor
    group: int  # windows per group: consecutive in the pool


@dataclass(frozen=True)
class _Move:
    """The paired moves of one tensor whose copies are not laid out in runs (``BlockMoves`` takes
    those): pair ``p`` adds ``step_a[p] * d_p`` to unit ``a[p]`` and takes ``step_b[p] * d_p`` from
    unit ``b[p]``. For units that are rows, ``d_p`` is the pool's window at ``starts[p]``; for units
    that are columns, row ``r`` of the directions (one entry per pair) is the window at ``starts[r]``."""

    axis: int
    a: torch.Tensor  # (P,) long, in copy groups (a unit's pairs next to each other)
    b: torch.Tensor
    starts: torch.Tensor  # (P,) long for axis 0, (rows,) for axis 1
    length: int  # elements of one unit
    step_a: torch.Tensor  # (P,)
    step_b: torch.Tensor
    pool: torch.Tensor

    def directions(self, start: int, end: int) -> torch.Tensor:
        """(end - start, length): the directions of pairs ``start:end``."""
        if self.axis == 0:
            return self.pool.unfold(0, self.length, 1).index_select(0, self.starts[start:end])
        return self.pool.unfold(0, end - start, 1).index_select(0, self.starts + start).t()

    def add_to(self, weight: torch.Tensor) -> None:
        for rows, step in self.steps():
            # along ``axis`` itself (an index_add_ into a moved-axis view is ~4x slower), from a
            # contiguous source, with alpha 1: any other alpha took ~30x longer (GPT-2's c_fc columns)
            weight.index_add_(self.axis, rows.to(weight.device), step.to(weight).movedim(0, self.axis).contiguous())

    def steps(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(rows, step) to add along the moved axis, a chunk of whole copy groups at a time. A
        first copy's moves are summed before they are yielded, so adding them to the weight gives
        the same bits as adding a zero-started offset that gathered them."""
        for start, end in _chunks(self.a, self.length):
            ca, cb = self.a[start:end], self.b[start:end]
            direction = self.directions(start, end)
            step_b = direction * -self.step_b[start:end, None]  # adding d x -s: the same bits as taking d x s
            step_a = direction * self.step_a[start:end, None]
            first, slot = torch.unique_consecutive(ca, return_inverse=True)
            if len(first) == len(ca):  # one pair per first copy (two copies a unit): nothing to gather
                yield ca, step_a
            else:
                gathered = torch.zeros((len(first), self.length), dtype=step_a.dtype)
                gathered.index_add_(0, slot, step_a)
                yield first, gathered
            yield cb, step_b


@dataclass
class BlockMoves:
    """One tensor's moves (``Separation.block_moves``), added to each block of rows as the tensor
    is made, top to bottom. Pair ``p`` moves units ``a_start + p`` and ``b_start + p``; for units
    that are rows, a first copy's norm is taken from its block, which comes before its copy's."""

    axis: int
    a_start: int
    b_start: int
    count: int
    starts: torch.Tensor
    length: int
    window_norms: torch.Tensor
    share_a: torch.Tensor
    share_b: torch.Tensor
    pool: torch.Tensor
    group: int  # windows per group: consecutive in the pool (``Separation._draw``)
    # The pool in a block's (dtype, device), cast once for a grow's tensors: a block made in bf16 is
    # moved in bf16 arithmetic, from the step and direction rounded to bf16 (ligo_core/rowblocks.py).
    cast_pools: dict = field(default_factory=dict)
    # The first copies' norms: given (``Separation.plan``), or taken from the blocks as they are made:
    # up front for columns (``take_column_norms``), from each block for rows.
    norms: torch.Tensor | None = None

    def __post_init__(self):
        self._measure = self.norms is None and self.axis == 0

    def add_to(self, weight: torch.Tensor) -> None:
        """Move a whole tensor in place, a block of rows at a time."""
        width = weight.shape[1] if self.axis == 0 else self.count
        rows = max(1, MOVE_BLOCK // max(width, 1))
        for top in range(0, weight.shape[0], rows):
            self.add_to_block(weight[top : top + rows], top)

    def take_column_norms(self, blocks: Iterable[torch.Tensor]) -> None:
        """For units that are columns, the first copies' norms from every block of rows (the tensor
        as made, before any move): a first pass, since a column's norm needs all its rows."""
        self.norms = _summed_column_norms((b[:, self.a_start : self.a_start + self.count] for b in blocks),
                                          self.count)

    def add_to_block(self, block: torch.Tensor, top: int) -> None:
        """Move rows ``top:top + len(block)`` of the tensor (``block``: fp32, or the output dtype) in place."""
        height = block.shape[0]
        if self.axis == 1:
            steps = [(first, sign, (share * (self.norms / self.window_norms)).to(block)[None])
                     for first, share, sign in ((self.a_start, self.share_a, 1), (self.b_start, self.share_b, -1))]
            for lo, hi, across in self._windows(top, top + height, self.count, block):
                for first, sign, step in steps:
                    block[lo - top : hi - top, first : first + self.count].addcmul_(across, step, value=sign)
            return
        if self.norms is None:
            self.norms = torch.full((self.count,), float("nan"))
        lo, hi = max(top, self.a_start), min(top + height, self.a_start + self.count)
        if lo < hi:  # first copies: their norms as made (unless given), then their moves
            rows = block[lo - top : hi - top]
            if self._measure:
                self.norms[lo - self.a_start : hi - self.a_start] = torch.linalg.vector_norm(
                    rows, dim=1, dtype=torch.float32).cpu()
            self._add(rows, lo - self.a_start, hi - self.a_start, self.share_a, 1)
        lo, hi = max(top, self.b_start), min(top + height, self.b_start + self.count)
        if lo < hi:
            self._add(block[lo - top : hi - top], lo - self.b_start, hi - self.b_start, self.share_b, -1)

    def _add(self, rows: torch.Tensor, first: int, end: int, share: torch.Tensor, sign: int) -> None:
        """rows += sign * step * direction, for pairs first:end, in one pass over the rows."""
        step = (share[first:end] * (self.norms[first:end] / self.window_norms[first:end]))[:, None].to(rows)
        for lo, hi, direction in self._windows(first, end, self.length, rows):
            rows[lo - first : hi - first].addcmul_(direction, step[lo - first : hi - first], value=sign)

    def _windows(self, first: int, end: int, width: int, like: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Windows ``first:end`` as (lo, hi, (hi - lo, width) view of the pool in ``like``'s dtype and
        device), a group's run at a time."""
        pool = self.pool
        if (like.dtype, like.device) != (pool.dtype, pool.device):
            key = (like.dtype, like.device)
            if key not in self.cast_pools:
                self.cast_pools[key] = pool.to(like)
            pool = self.cast_pools[key]
        lo = first
        while lo < end:
            hi = min(end, (lo // self.group + 1) * self.group)
            start = int(self.starts[lo])
            yield lo, hi, pool[start : start + (hi - lo) * width].view(hi - lo, width)
            lo = hi


class LazyOffsets(Mapping):
    """Large name -> offset tensor, made when read (the same numbers every time)."""

    def __init__(self, moves: dict[str, tuple[BlockMoves | _Move, torch.Size, torch.dtype, torch.device]]):
        self._moves = moves

    def __getitem__(self, name: str) -> torch.Tensor:
        move, shape, dtype, device = self._moves[name]
        offset = torch.zeros(shape, dtype=dtype, device=device)
        move.add_to(offset)
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


def _chunks(a: torch.Tensor, length: int, elements: int | None = None) -> Iterator[tuple[int, int]]:
    """Pieces of the pairs, each holding whole copy groups and about ``elements`` (MOVE_CHUNK)."""
    step_rows = max(1, (elements or MOVE_CHUNK) // max(length, 1))
    start = 0
    while start < len(a):
        end = min(start + step_rows, len(a))
        while end < len(a) and a[end] == a[end - 1]:  # a copy group stays in one chunk
            end += 1
        yield start, end
        start = end


def _across_norms(pool: torch.Tensor, starts: torch.Tensor, width: int, group: int) -> torch.Tensor:
    """(width,): the norm of each column of the directions whose row ``r`` is the pool's window at
    ``starts[r]``; the rows of a group are consecutive windows, so each group is one slice of the
    pool (summed in fp32 within a group, in fp64 across)."""
    total = torch.zeros(width, dtype=torch.float64)
    for first in range(0, len(starts), group):
        rows, start = min(group, len(starts) - first), int(starts[first])
        total += pool[start : start + rows * width].view(rows, width).square().sum(0)
    return total.sqrt().float()


def _run_start(units: torch.Tensor) -> int | None:
    """The first unit of ``units`` if they are consecutive (``first, first + 1, ...``), else None."""
    if len(units) == 0 or not torch.equal(units, torch.arange(int(units[0]), int(units[0]) + len(units))):
        return None
    return int(units[0])


def _pair_norms(weight: torch.Tensor, axis: int, a: torch.Tensor) -> torch.Tensor:
    """(P,): the norms of the first copies ``a`` (units along ``axis``), read a chunk at a time."""
    first = _run_start(a)
    if first is not None and axis == 0:  # a run of rows: the norms of a view, nothing gathered
        return torch.linalg.vector_norm(weight[first : first + len(a)].float(), dim=1).cpu()
    if first is not None:  # a run of columns: sums of squares a block of rows at a time (a strided norm is slow)
        return column_norms(weight[:, first : first + len(a)])
    units = weight.movedim(axis, 0)
    norms = [units[a[start:end].to(weight.device)].reshape(end - start, -1).float().norm(dim=1).cpu()
             for start, end in _chunks(a, _numel(tuple(units.shape[1:])))]
    return torch.cat(norms) if norms else torch.zeros(0)


def column_norms(columns: torch.Tensor) -> torch.Tensor:
    """(n,): the norms of a (rows, n) view's columns, summed a block of rows at a time (fp32 within a
    block, fp64 across: a strided norm is slow, and fp32 over 128k rows loses digits)."""
    rows = max(1, MOVE_BLOCK // max(columns.shape[1], 1))
    return _summed_column_norms((columns[top : top + rows] for top in range(0, columns.shape[0], rows)),
                                columns.shape[1])


def _summed_column_norms(blocks: Iterable[torch.Tensor], count: int) -> torch.Tensor:
    """(count,): the norms of the columns of blocks of rows stacked, on the CPU (each block's squares
    summed in fp32 on its device, the blocks in fp64)."""
    total = None
    for block in blocks:
        block = block.float()
        squares = (block * block).sum(0)
        total = squares.double() if total is None else total.add_(squares)
    return total.sqrt().float().cpu() if total is not None else torch.zeros(count)
