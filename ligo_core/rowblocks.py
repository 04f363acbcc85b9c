"""A fixed operator's tensors made a block of rows at a time, moved apart and cast as they are made.

A 2D tensor is made top to bottom: the small tensor's columns are widened (once: most small rows
become several large rows), then each block of large rows is gathered (and scaled) from those rows
(``RowPlan.expand_at``), moved apart where it holds copies (``separation.BlockMoves``) and cast
into its place in the output. Every block is about BLOCK elements, so it stays in the CPU's
last-level cache and its memory is reused; besides the output, only the column-widened small
tensor is as large as a fraction of the tensor (none for an embedding, whose rows keep their
number: its blocks are widened one by one). Growing 1B -> 8B this way is several times faster than
widening whole tensors and moving them afterwards (docs/BENCHMARKS.md, "Real sizes").

The in-memory and the streamed grow of a fixed strategy both make their tensors here, so they
write the same bits. Tensors this cannot make by blocks (vectors, a fused first axis, copies not
laid out in runs) are made whole, as ``GrowthOperator.fixed_tensor`` makes them, and moved whole.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch

from ligo_core.families import TensorSpec
from ligo_core.operator import GrowthOperator
from ligo_core.separation import Separation

BLOCK = 2**22  # elements of a block: 16 MB in fp32 (2^18 to 2^24 measured on 1B -> 8B: 2^22 was fastest)

# (name, shape) -> the tensor to fill (a writer's reusable buffer); None: a new tensor
Allocate = Callable[[str, tuple[int, ...]], torch.Tensor]


def fixed_tensors(operator: GrowthOperator, read: Callable[[str], torch.Tensor], names: dict[str, str],
                  separation: Separation | None, dtype: torch.dtype, allocate: Allocate | None = None
                  ) -> Iterator[tuple[TensorSpec, int, str, torch.Tensor]]:
    """Every large tensor in spec order, (spec, large layer, full name, tensor in ``dtype``), moved
    apart by ``separation`` (its draws are taken in this order)."""
    for spec in operator.specs:
        full = names[spec.name]
        for layer in range(operator.large_layers) if spec.per_layer else [0]:
            name = full.format(i=layer) if spec.per_layer else full
            yield spec, layer, name, grown_tensor(operator, spec, read, full, layer, separation, dtype,
                                                  functools.partial(allocate, name) if allocate else None)


@torch.no_grad()
def grown_tensor(operator: GrowthOperator, spec: TensorSpec, read: Callable[[str], torch.Tensor], full: str,
                 layer: int, separation: Separation | None, dtype: torch.dtype,
                 allocate: Callable[[tuple[int, ...]], torch.Tensor] | None = None) -> torch.Tensor:
    """Large layer ``layer`` of ``spec`` (``full``: its name with ``{i}``), moved apart, in ``dtype``
    (``allocate(shape)``: the tensor to make it in)."""
    small = operator.small_tensor(spec, read, full, layer)
    plan = _first_axis_plan(operator, spec, small)
    if plan is not False:
        rows = plan.src.shape[1] if plan is not None else small.shape[0]
        columns = operator.expand_axis(spec, small[:0].float(), 1, layer).shape[1]
        moves = _block_moves(separation, spec, layer, torch.Size((rows, columns)))
    if plan is False or moves is False:
        grown = operator._expand_stored(spec, small.float(), layer)
        if separation is not None:
            separation.move(grown, spec, layer)
        return _filled(grown.to(dtype), allocate)

    out = allocate((rows, columns)) if allocate is not None else torch.empty((rows, columns), dtype=dtype,
                                                                             device=small.device)
    height = max(1, BLOCK // max(columns, 1))
    if out.device == small.device and (plan is None or plan.exact_in(layer, dtype, copies=True)):
        return _made_in_place(operator, spec, small, plan, layer, moves, out, height)
    if plan is not None:
        # Rows copied into several large rows: their columns are widened once, before the blocks gather them.
        wide = operator.expand_axis(spec, small.float(), 1, layer)  # small may be in its stored dtype (ReadCache)
        total = wide.sum(0) if len(plan.mean_rows) else None

    def block_at(top: int) -> torch.Tensor:
        end = min(top + height, rows)
        if plan is not None:
            return plan.expand_at(wide, layer, torch.arange(top, end), total)
        block = operator.expand_axis(spec, small[top:end].float(), 1, layer)
        # a block that is still a view of the small tensor is copied before it is moved
        return block.clone() if block.untyped_storage().data_ptr() == small.untyped_storage().data_ptr() else block

    if moves is not None and moves.axis == 1:  # units are columns: their norms need every row first
        moves.take_column_norms(block_at(top) for top in range(0, rows, height))
    for top in range(0, rows, height):
        block = block_at(top)
        if moves is not None:
            moves.add_to_block(block, top)
        out[top : top + block.shape[0]].copy_(block)
    return out


def _made_in_place(operator: GrowthOperator, spec: TensorSpec, small: torch.Tensor, plan, layer: int, moves,
                   out: torch.Tensor, height: int) -> torch.Tensor:
    """The tensor made in ``out``'s dtype, block by block in ``out`` itself (no fp32 block, no cast
    pass), for tensors whose rows are copies of the column-widened small rows (scales 0 or +-1).
    Before moves, every value is the fp32 one rounded once: the columns are widened in ``out``'s
    dtype only where that is exact (``columns_exact``), else in fp32 and rounded. Moves are then
    added in ``out``'s dtype arithmetic, from the step and direction rounded to it:
    round(round(w) + round(s) x round(d)), not round(w + s x d): a moved entry may round the other
    way, by no more than the dtype's rounding of the tensor's largest entries (tests/test_stream.py),
    and the move's length and balance hold to the dtype's precision. Adding fp32 steps to a bf16
    block instead was 5x slower."""
    columns_exact = small.dtype == out.dtype and operator.exact_axis(spec, 1, layer, out.dtype)
    if plan is not None:
        wide = operator.expand_axis(spec, small if columns_exact else small.float(), 1, layer).to(out.dtype)
    columns = moves is not None and moves.axis == 1  # units are columns: norms from every row, then moves
    for top in range(0, out.shape[0], height):
        block = out[top : top + height]
        if plan is not None:
            plan.copy_rows(wide, layer, top, top + block.shape[0], block)
        else:
            rows = small[top : top + block.shape[0]]
            block.copy_(operator.expand_axis(spec, rows if columns_exact else rows.float(), 1, layer))
        if moves is not None and not columns:
            moves.add_to_block(block, top)
    if columns:  # a second pass over the tensor as made: norms first, then the moves
        moves.take_column_norms(out[top : top + height] for top in range(0, out.shape[0], height))
        for top in range(0, out.shape[0], height):
            moves.add_to_block(out[top : top + height], top)
    return out


def _first_axis_plan(operator: GrowthOperator, spec: TensorSpec, small: torch.Tensor):
    """The row plan of stored axis 0 (None: it keeps its size), or False: not made by blocks."""
    if small.dim() != 2 or spec.norm_gain:
        return False
    try:
        return operator.axis_plan(spec, 0, 2)
    except ValueError:  # a fused first axis
        return False


def _block_moves(separation: Separation | None, spec: TensorSpec, layer: int, shape: torch.Size):
    """The tensor's ``BlockMoves`` (None: nothing to move), or False: its copies are not in runs."""
    if separation is None:
        return None
    try:
        return separation.block_moves(spec, layer, shape)
    except ValueError:
        return False


def _filled(tensor: torch.Tensor, allocate: Callable[[tuple[int, ...]], torch.Tensor] | None) -> torch.Tensor:
    if allocate is None:
        return tensor
    return allocate(tuple(tensor.shape)).copy_(tensor)
