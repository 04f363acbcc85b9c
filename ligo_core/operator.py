"""The linear growth operator: width expanders per space and depth mixing per tensor.

Layout (PyTorch convention, a linear weight is ``(out, in)``)::

    W_deep[l] = sum_j depth[t][l, j] * W_small[j]           # depth: blend small layers
    W_large[l] = E_out[l] @ W_deep[l] @ F_in[l]^T           # width: expand both sides

An expander of a space (``d1 -> d2`` units) is stored as ``P [diag(top); C]``: every old unit
keeps one row that is a scaled copy of itself (``top``), the ``d2 - d1`` new units are free rows
``C``, and ``P`` (``order``) places rows where the large model wants them (heads of a GQA group,
head dimensions under rotary positions). Each space has an output-side expander ``E`` and an
input-side expander ``F``. This is the reference LiGO parameterisation ``B = [I; C]`` with a
learnable diagonal and a fixed placement, so applying it costs ``(d2 - d1) / d2`` of a dense one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from ligo_core.families import Family, TensorSpec


@dataclass
class ExpanderInit:
    """Initial values of one space's expanders; per-layer spaces have a leading layer dim."""

    order: torch.Tensor  # (d2,) final row i = stacked row order[i]
    top_e: torch.Tensor  # (L, d1)
    c_e: torch.Tensor  # (L, r, d1)
    top_f: torch.Tensor  # (L, d1)
    c_f: torch.Tensor  # (L, r, d1)


class ExpanderLayer(nn.Module):
    """One large layer's expander values (a global expander has one): ``top`` (d1,) and ``C``
    (r, d1) for each side. Their own parameters, so that a layer's values are what FSDP gathers
    when that layer is made (ligo_core/sharding.py), not every layer's at once."""

    def __init__(self, top_e: torch.Tensor, c_e: torch.Tensor, top_f: torch.Tensor, c_f: torch.Tensor):
        super().__init__()
        self.top_e = nn.Parameter(top_e.clone().float())
        self.c_e = nn.Parameter(c_e.clone().float())
        self.top_f = nn.Parameter(top_f.clone().float())
        self.c_f = nn.Parameter(c_f.clone().float())

    def side(self, side: str) -> tuple[nn.Parameter, nn.Parameter]:
        """(top, C) of side ``side`` ("E" or "F")."""
        return (self.top_e, self.c_e) if side == "E" else (self.top_f, self.c_f)

    def stacked(self, x: torch.Tensor, side: str) -> torch.Tensor:
        """``[diag(top); C] @ x`` for ``x`` of shape (B, d1, m): (B, d2, m) in the stacked row order."""
        top, c = (v.to(x.dtype) for v in self.side(side))
        return torch.cat([top[:, None] * x, torch.matmul(c, x)], dim=1)


class Expander(nn.Module):
    def __init__(self, init: ExpanderInit):
        super().__init__()
        self.register_buffer("order", init.order.clone(), persistent=True)
        self.layers = nn.ModuleList(ExpanderLayer(init.top_e[i], init.c_e[i], init.top_f[i], init.c_f[i])
                                    for i in range(init.top_e.shape[0]))
        # The placement is fixed: its inverse (large position of each stacked row) and whether it is
        # the identity are worked out once, not on every application.
        self.register_buffer("inverse", torch.argsort(self.order), persistent=False)
        self.identity = bool(torch.equal(self.order, torch.arange(self.d2)))
        self._plans: dict[str, tuple] = {}

    @property
    def d1(self) -> int:
        return self.layers[0].top_e.shape[-1]

    @property
    def d2(self) -> int:
        return self.order.shape[0]

    def values(self, side: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(top (L, d1), each layer's C (r, d1)) of one side: the tops stacked, the C's as they are."""
        tops, cs = zip(*(unit.side(side) for unit in self.layers))
        return torch.stack(tops), list(cs)

    def expand(self, x: torch.Tensor, side: str, layer: int | None = None) -> torch.Tensor:
        """Expand ``x`` of shape (L, d1, m) along dim 1 to (L, d2, m); differentiable. With ``layer``,
        ``x`` is that one large layer (L = 1) and a per-layer expander uses that layer's values."""
        if len(self.layers) == 1:  # a global expander applied to every layer
            stacked = self.layers[0].stacked(x, side)
        elif layer is not None:
            stacked = self.layers[layer].stacked(x, side)
        else:
            stacked = torch.cat([unit.stacked(x[i : i + 1], side) for i, unit in enumerate(self.layers)])
        if self.identity:
            return stacked
        return _PermuteRows.apply(stacked, self.order, self.inverse)

    @torch.no_grad()
    def row_plan(self, side: str) -> RowPlan:
        """How to build each large unit cheaply from the current values (cached until they change)."""
        key = (side, *((p.data_ptr(), p._version) for unit in self.layers for p in unit.side(side)))
        if self._plans.get(side, (None,))[0] != key:
            self._plans[side] = (key, RowPlan.build(*self.values(side), self.order, self.inverse))
        return self._plans[side][1]

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda(): drop plans built on the old device
        self._plans = {}
        return super()._apply(fn, *args, **kwargs)


def compact(init: ExpanderInit) -> ExpanderInit:
    """One layer's expander init with C stored as sparse COO (see ``PlannedExpander``)."""
    return replace(init, c_e=init.c_e[0].to_sparse().coalesce(), c_f=init.c_f[0].to_sparse().coalesce())


def dense(init: ExpanderInit) -> ExpanderInit:
    """A ``compact`` init back in the dense (1, r, d1) layout."""
    return replace(init, c_e=init.c_e.to_dense()[None], c_f=init.c_f.to_dense()[None])


class PlannedExpander(nn.Module):
    """A fixed expander kept as its row plans only (``RowPlan.from_compact``): what a fixed strategy
    applies, without the dense C matrices of a learnable one (an 8B target's FFN expanders alone
    would be 13 GB in fp32). Nothing to learn: ``expand`` (the differentiable path) is refused."""

    def __init__(self, layers: list[ExpanderInit]):
        super().__init__()
        order = layers[0].order
        if any(not torch.equal(i.order, order) for i in layers):
            raise AssertionError("per-layer expanders must share one placement")
        self.register_buffer("order", order.clone(), persistent=True)
        self.register_buffer("inverse", torch.argsort(self.order), persistent=False)
        self._d1 = layers[0].top_e.shape[-1]
        self._plans = {
            "E": RowPlan.from_compact(torch.cat([i.top_e for i in layers]), [i.c_e for i in layers], order,
                                      self.inverse),
            "F": RowPlan.from_compact(torch.cat([i.top_f for i in layers]), [i.c_f for i in layers], order,
                                      self.inverse),
        }
        # What the learnable expander would count: both sides' diagonal and C.
        self.dense_parameters = len(layers) * 2 * (self._d1 + (self.d2 - self._d1) * self._d1)

    @property
    def d1(self) -> int:
        return self._d1

    @property
    def d2(self) -> int:
        return self.order.shape[0]

    def row_plan(self, side: str) -> RowPlan:
        return self._plans[side]

    def expand(self, x: torch.Tensor, side: str, layer: int | None = None) -> torch.Tensor:
        raise TypeError("a planned expander is fixed: build the operator without planned=True to fit it")


class _PermuteRows(torch.autograd.Function):
    """``x.index_select(1, order)`` for a permutation; its backward is the inverse gather, not an
    ``index_add_`` (which dominated the fitting step's backward on CPU)."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(1, order)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


@dataclass
class RowPlan:
    """A fixed expander side, row by row: most large units are a scaled copy of one small unit
    (``src``, ``scale``; a zero row is a copy scaled by 0), some are a multiple of the sum of all
    small units (``mean_*``: the mean pads), some have a few non-zero entries (``sparse_*``: the
    pads' paired noise), the rest are dense rows (``dense_*``). Applying it costs a gather plus
    work for the few other rows, instead of a full matrix product.
    Per-layer tensors have a leading layer dim (1 for a global expander)."""

    src: torch.Tensor  # (L, d2) long
    scale: torch.Tensor  # (L, d2)
    mean_rows: torch.Tensor  # (M,) long: large positions
    mean_coef: torch.Tensor  # (L, M)
    sparse_rows: torch.Tensor  # (S,) long
    sparse_idx: torch.Tensor  # (L, S, K) long: the non-zero entries' small units
    sparse_val: torch.Tensor  # (L, S, K)
    dense_rows: torch.Tensor  # (D,) long
    dense_c: torch.Tensor  # (L, D, d1)
    all_ones: bool  # every row is a copy with scale 1 (no mean, sparse or dense rows)
    runs: list[list[tuple[int, int, int]]] | None  # per layer: (to, from, length) slices of src

    MAX_RUNS = 64  # beyond this many slices, one gather is faster
    MAX_SPARSE = 8  # non-zero entries up to which a row is built from gathers, not a matrix product

    @staticmethod
    def build(top: torch.Tensor, cs: list[torch.Tensor], order: torch.Tensor, position: torch.Tensor) -> RowPlan:
        """``top`` (L, d1), ``cs`` each layer's C (r, d1); ``order``: stacked row of each large unit;
        ``position``: its inverse. C is read a layer at a time: it is the size of the operator (GBs
        for an 8B target), so nothing the size of all layers' C is made beside it."""
        # Few passes over each C, with no integer casts. A row is a copy when its one largest |entry|
        # is all its mass.
        largest, c_src, mass = [], [], []
        for c in cs:
            magnitude = c.abs()
            big, src = magnitude.max(-1)
            largest.append(big)
            c_src.append(src)
            mass.append(magnitude.sum(-1))
            del magnitude
        c_src = torch.stack(c_src)
        gather_ok = (torch.stack(mass) == torch.stack(largest)).all(0)  # (r,): a copy (or zero) in every layer
        rest = (~gather_ok).nonzero().squeeze(1)
        constant = torch.stack([(c[rest] == c[rest, :1]).all(-1) for c in cs]).all(0)
        few = torch.stack([(c[rest] != 0).sum(-1) <= RowPlan.MAX_SPARSE for c in cs]).all(0) & ~constant
        c_scale = torch.stack([torch.gather(c, 1, s.unsqueeze(-1)).squeeze(-1) for c, s in zip(cs, c_src)]) * gather_ok
        return RowPlan._assemble(top, c_src, c_scale, gather_ok, rest, constant, few,
                                 lambda rows: torch.stack([c[rows] for c in cs]), order, position)

    @staticmethod
    def from_compact(top: torch.Tensor, cs: list[torch.Tensor], order: torch.Tensor,
                     position: torch.Tensor) -> RowPlan:
        """``build`` from each layer's C as a sparse COO tensor (a fixed operator's C is almost all
        zeros: one entry per copied unit, a few per pad), without the dense (L, r, d1) stack."""
        layers, d1 = top.shape
        r = cs[0].shape[0]
        total, largest = torch.zeros(layers, r), torch.zeros(layers, r)
        c_src, c_val = torch.zeros(layers, r, dtype=torch.long), torch.zeros(layers, r)
        count, first, off = (torch.zeros(layers, r, dtype=torch.long), torch.zeros(layers, r),
                             torch.zeros(layers, r, dtype=torch.long))
        for layer, c in enumerate(cs):
            rows, cols = c.indices()
            values = c.values()
            size = values.abs()
            total[layer].index_add_(0, rows, size)
            largest[layer].scatter_reduce_(0, rows, size, "amax")
            count[layer].index_add_(0, rows, torch.ones_like(rows))
            at_max = (size == largest[layer, rows]).nonzero().squeeze(1).flip(0)  # first column wins
            c_src[layer, rows[at_max]], c_val[layer, rows[at_max]] = cols[at_max], values[at_max]
            lead = cols == 0
            first[layer, rows[lead]] = values[lead]
            off[layer].index_add_(0, rows, (values != first[layer, rows]).long())
        gather_ok = (total == largest).all(0)
        rest = (~gather_ok).nonzero().squeeze(1)
        constant = ((count[:, rest] == d1) & (off[:, rest] == 0)).all(0)
        few = (count[:, rest] <= RowPlan.MAX_SPARSE).all(0) & ~constant
        c_scale = c_val * gather_ok

        def rows_of(idx: torch.Tensor) -> torch.Tensor:  # (L, len(idx), d1), dense: the few rows asked for
            return torch.stack([c.index_select(0, idx).to_dense() for c in cs])

        return RowPlan._assemble(top, c_src, c_scale, gather_ok, rest, constant, few, rows_of, order, position)

    @staticmethod
    def _assemble(top, c_src, c_scale, gather_ok, rest, constant, few, rows_of, order, position) -> RowPlan:
        layers, d1 = top.shape
        mean_ok, sparse, dense = (torch.zeros_like(gather_ok) for _ in range(3))
        mean_ok[rest[constant]], sparse[rest[few]], dense[rest[~constant & ~few]] = True, True, True
        own = torch.arange(d1, device=top.device).expand(layers, d1)  # the top rows copy their own unit
        src = torch.cat([own, c_src], dim=1)[:, order]
        scale = torch.cat([top, c_scale], dim=1)[:, order]
        mean_idx, dense_idx = mean_ok.nonzero().squeeze(1), dense.nonzero().squeeze(1)
        sparse_idx = sparse.nonzero().squeeze(1)
        k = min(RowPlan.MAX_SPARSE, d1) if len(sparse_idx) else 0
        sparse_c = rows_of(sparse_idx)
        entries = sparse_c.abs().topk(k, dim=-1).indices  # (L, S, K); zeros past a row's nnz
        return RowPlan(
            src=src, scale=scale,
            mean_rows=position[d1 + mean_idx], mean_coef=rows_of(mean_idx)[:, :, 0],
            sparse_rows=position[d1 + sparse_idx], sparse_idx=entries,
            sparse_val=torch.gather(sparse_c, 2, entries),
            dense_rows=position[d1 + dense_idx], dense_c=rows_of(dense_idx),
            all_ones=bool((scale == 1).all()) and not len(rest),
            runs=_runs(src, position[d1 + rest], RowPlan.MAX_RUNS),
        )

    def expand_at(self, x: torch.Tensor, layer: int, positions: torch.Tensor, total: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """Rows ``positions`` of ``expand(x, 0, layer)`` for a 2D ``x``, in fp32, from ``x``'s rows alone
        (the other large rows are never made; rows are gathered in ``x``'s dtype, then widened);
        ``total``: ``x.sum(0)`` in fp32, for mean pads."""
        layer = layer if self.src.shape[0] > 1 else 0
        y = x.index_select(0, self.src[layer, positions]).float()
        if not self.all_ones:
            y.mul_(self.scale[layer, positions, None].float())
        kinds = self._kinds()
        for kind, slots in ((k, kinds[k][positions]) for k in ("mean", "sparse", "dense")):
            at = (slots >= 0).nonzero().squeeze(1)
            if not len(at):
                continue
            slot = slots[at]
            if kind == "mean":
                y[at] = (total if total is not None else x.float().sum(0)) * self.mean_coef[layer, slot, None].float()
            elif kind == "sparse":
                # fp32 values times x's rows: the products are fp32 whatever x's dtype
                y[at] = _gathered_sum(x, 0, self.sparse_idx[layer, slot], self.sparse_val[layer, slot].float())
            else:
                y[at] = self.dense_c[layer, slot].float() @ x.float()
        return y

    def exact_in(self, layer: int, dtype: torch.dtype, copies: bool = False) -> bool:
        """Whether applying this side to ``dtype`` values in ``dtype`` gives the bits of applying it in
        fp32 and rounding once: every large unit is one small unit times a scale ``dtype`` holds (a
        product of two such numbers is exact in fp32, so the one rounding is the same), with no pads
        made of sums. ``copies``: the scales must be 0 or +-1 (the units are values already rounded)."""
        if len(self.mean_rows) or len(self.sparse_rows) or len(self.dense_rows):
            return False
        scale = self.scale[layer if self.scale.shape[0] > 1 else 0]
        if copies:
            return bool(((scale == 0) | (scale.abs() == 1)).all())
        return bool((scale.to(dtype).float() == scale.float()).all())

    def copy_rows(self, x: torch.Tensor, layer: int, top: int, end: int, out: torch.Tensor) -> torch.Tensor:
        """Rows ``top:end`` of ``expand(x, 0, layer)`` gathered into ``out``, in ``out``'s dtype, for a
        side whose units are copies (``exact_in(..., copies=True)``)."""
        layer = layer if self.src.shape[0] > 1 else 0
        torch.index_select(x, 0, self.src[layer, top:end], out=out)
        if not self.all_ones:
            out.mul_(self.scale[layer, top:end, None].to(out.dtype))  # 0 or +-1: exact
        return out

    def _kinds(self) -> dict[str, torch.Tensor]:
        """Per large position: its slot among the mean, sparse and dense rows (-1 where it is none)."""
        if getattr(self, "_kind_slots", None) is None:
            slots = {}
            for kind, rows in (("mean", self.mean_rows), ("sparse", self.sparse_rows), ("dense", self.dense_rows)):
                slot = torch.full((self.src.shape[1],), -1, dtype=torch.long, device=self.src.device)
                slot[rows] = torch.arange(len(rows), device=self.src.device)
                slots[kind] = slot
            self._kind_slots = slots
        return self._kind_slots

    def expand(self, x: torch.Tensor, dim: int, layer: int) -> torch.Tensor:
        """Expand dim ``dim`` of one layer's tensor ``x`` (any rank) from d1 to d2 units."""
        layer = layer if self.src.shape[0] > 1 else 0
        if self.runs is None:
            y = x.index_select(dim, self.src[layer])
        else:  # slices: a gather along a non-leading dim is ~10x slower than copying slices on CPU
            shape = list(x.shape)
            shape[dim] = self.src.shape[1]
            y = x.new_empty(shape)
            scale = None if self.all_ones else self.scale[layer].to(x.dtype).view([-1] + [1] * (x.dim() - dim - 1))
            for to, start, length in self.runs[layer]:
                if scale is None:
                    y.narrow(dim, to, length).copy_(x.narrow(dim, start, length))
                else:  # copied and scaled in one pass
                    torch.mul(x.narrow(dim, start, length), scale.narrow(0, to, length), out=y.narrow(dim, to, length))
        if self.all_ones:
            return y
        shape = [1] * x.dim()
        shape[dim] = -1
        if self.runs is None:
            y.mul_(self.scale[layer].to(x.dtype).view(shape))
        if len(self.mean_rows):
            total = x.sum(dim, keepdim=True)
            y.index_copy_(dim, self.mean_rows, total * self.mean_coef[layer].to(x.dtype).view(shape))
        if len(self.sparse_rows):
            part = _gathered_sum(x, dim, self.sparse_idx[layer], self.sparse_val[layer].to(x.dtype))
            y.index_copy_(dim, self.sparse_rows, part)
        if len(self.dense_rows):
            part = torch.tensordot(self.dense_c[layer].to(x.dtype), x, dims=([1], [dim])).movedim(0, dim)
            y.index_copy_(dim, self.dense_rows, part)
        return y


def _gathered_sum(x: torch.Tensor, dim: int, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """Along ``dim``, unit ``s`` of the answer is ``sum_t val[s, t] * x[idx[s, t]]`` (a RowPlan's
    sparse rows): a few gathers, not a matrix product."""
    shape = [1] * x.dim()
    shape[dim] = -1
    part = x.index_select(dim, idx[:, 0]) * val[:, 0].view(shape)
    for t in range(1, idx.shape[1]):
        part.add_(x.index_select(dim, idx[:, t]) * val[:, t].view(shape))
    return part


def _canonical(x: torch.Tensor, spec: TensorSpec, per_layer: bool) -> torch.Tensor:
    """(L, out, in) or (L, out, 1) view of a tensor, whatever its storage."""
    if not per_layer:
        x = x.unsqueeze(0)
    if x.dim() == 2:
        return x.unsqueeze(-1)
    return x.transpose(1, 2) if spec.stored_transposed else x


def _stored(x: torch.Tensor, spec: TensorSpec, per_layer: bool, vector: bool) -> torch.Tensor:
    if vector:
        x = x.squeeze(-1)
    elif spec.stored_transposed:
        x = x.transpose(1, 2)
    return x if per_layer else x.squeeze(0)


class GrowthOperator(nn.Module):
    """Width expanders (``res`` global; ``q``/``k``/``v``/``ffn`` per large layer) and depth mixing."""

    def __init__(
        self,
        family: Family,
        specs: list[TensorSpec],
        expanders: dict[str, ExpanderInit | nn.Module],
        depth: dict[str, torch.Tensor],
        norm_scale: float,
        head_tied: bool,
        small_dims: dict[str, int],
        large_layers: int,
        noise: float = 0.0,
        spread: float = 0.0,
    ):
        super().__init__()
        self.family = family
        self.specs = specs
        self.expanders = nn.ModuleDict({name: init if isinstance(init, nn.Module) else Expander(init)
                                        for name, init in expanders.items()})
        # Depth coefficients, one (L2, L1) matrix per layer tensor; keys may not contain dots.
        self.depth = nn.ParameterDict({_key(n): nn.Parameter(w.clone().float()) for n, w in depth.items()})
        self.norm_scale = norm_scale
        self.head_tied = head_tied
        self.small_dims = small_dims
        self.large_layers = large_layers
        self.noise = noise  # the symmetry breaking its initial expanders were drawn with
        self.spread = spread  # how far copies are moved apart once materialised (ligo_core/separation.py)

    def num_parameters(self) -> int:
        planned = sum(getattr(e, "dense_parameters", 0) for e in self.expanders.values())
        return sum(p.numel() for p in self.parameters()) + planned

    def _side(self, side: str) -> str:
        if side == "H":
            return "F" if self.head_tied else "E"
        return side

    def _expand_dim(self, x: torch.Tensor, dim: tuple[str, str] | None, spec: TensorSpec,
                    layer: int | None = None) -> torch.Tensor:
        """Expand dim 1 of (L, d1, m)."""
        if dim is None:
            return x
        space, side = dim
        side = self._side(side)
        if "+" in space:  # fused projections (GPT-2's c_attn): expand each part with its own space
            sizes = [self.small_dims[s] for s in spec.fused]
            parts = torch.split(x, sizes, dim=1)
            return torch.cat([self.expanders[s].expand(p, side, layer) for s, p in zip(spec.fused, parts)], dim=1)
        return self.expanders[space].expand(x, side, layer)

    def expand_tensor(self, spec: TensorSpec, x: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Grow one tensor; ``x`` is the stack of all small layers for a per-layer tensor. With
        ``layer``, only that large layer is grown (the result keeps a leading dim of 1)."""
        per_layer = spec.per_layer
        if per_layer:
            w = self.depth[_key(spec.name)]
            w = (w if layer is None else w[layer : layer + 1]).to(x.dtype)
            x = torch.einsum("lj,j...->l...", w, x)
        vector = x.dim() == (2 if per_layer else 1)
        y = _canonical(x, spec, per_layer)
        y = self._expand_dim(y, spec.dims[0], spec, layer)
        if len(spec.dims) == 2:
            y = self._expand_dim(y.transpose(1, 2), spec.dims[1], spec, layer).transpose(1, 2)
        if spec.norm_gain:
            y = y * self.norm_scale
        return _stored(y, spec, per_layer, vector)

    def materialise(self, small: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
        """The large model's tensors from the small model's.

        ``names`` maps each spec name (relative, with ``{i}``) to its full name in the checkpoint.
        Per-layer tensors come back as one tensor per large layer. Under ``no_grad`` (a fixed
        operator, or a fitted one being written out) the cheap row-by-row path is taken; with
        grad (fitting) the differentiable one.
        """
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())):
            return self._materialise_fixed(small, names)
        large: dict[str, torch.Tensor] = {}
        for spec in self.specs:
            full = names[spec.name]
            if spec.per_layer:
                stack = torch.stack([small[full.format(i=j)] for j in range(self.depth[_key(spec.name)].shape[1])])
                # unbind, not grown[layer]: one backward node instead of one select per layer
                for layer, tensor in enumerate(self.expand_tensor(spec, stack).unbind(0)):
                    large[full.format(i=layer)] = tensor
            else:
                large[full] = self.expand_tensor(spec, small[full])
        return large

    def materialise_tensor(self, spec: TensorSpec, small: dict[str, torch.Tensor], full: str,
                           layer: int | None = None) -> torch.Tensor:
        """One tensor of the large model (large layer ``layer`` of a per-layer spec), differentiable;
        ``full`` is the spec's full name with ``{i}``. Costs one large tensor, not the whole model."""
        if not spec.per_layer:
            return self.expand_tensor(spec, small[full])
        stack = torch.stack([small[full.format(i=j)] for j in range(self.depth[_key(spec.name)].shape[1])])
        return self.expand_tensor(spec, stack, layer)[0]

    @torch.no_grad()
    def _materialise_fixed(self, small: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
        return {name: tensor for _, _, name, tensor in self.iter_fixed(small.__getitem__, names)}

    @torch.no_grad()
    def iter_fixed(
        self, read: Callable[[str], torch.Tensor], names: dict[str, str]
    ) -> Iterator[tuple[TensorSpec, int, str, torch.Tensor]]:
        """The large tensors one at a time, in spec order: (spec, large layer, full name, tensor).

        ``read`` gives a small tensor by its full name (from memory, or lazily from disk); only the
        small layers a large layer mixes are read for it, so a caller that writes each tensor out
        before asking for the next holds one output tensor at a time (ligo_core/stream.py)."""
        for spec in self.specs:
            full = names[spec.name]
            for layer in range(self.large_layers) if spec.per_layer else [0]:
                yield spec, layer, full.format(i=layer) if spec.per_layer else full, \
                    self.fixed_tensor(spec, read, full, layer)

    @torch.no_grad()
    def fixed_tensor(self, spec: TensorSpec, small: Callable[[str], torch.Tensor] | dict[str, torch.Tensor],
                     full: str, layer: int | None = None) -> torch.Tensor:
        """One tensor as ``materialise`` makes it under ``no_grad`` (the cheap row-by-row path);
        ``small`` gives the small tensors by full name (a dict, or a reader); only the small layers
        that large layer ``layer`` mixes are read."""
        return self._expand_stored(spec, self.small_tensor(spec, small, full, layer), layer if spec.per_layer else 0)

    @torch.no_grad()
    def small_tensor(self, spec: TensorSpec, small: Callable[[str], torch.Tensor] | dict[str, torch.Tensor],
                     full: str, layer: int | None = None) -> torch.Tensor:
        """What large layer ``layer`` of ``spec`` widens: the small layers it mixes, mixed (only those
        are read); the small tensor itself for a global spec."""
        read = small.__getitem__ if isinstance(small, dict) else small
        if not spec.per_layer:
            return read(full)
        weights = self.depth[_key(spec.name)]
        return _mix_layers(weights[layer], _LayerReader(read, full, weights.shape[1]))

    def _expand_stored(self, spec: TensorSpec, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Grow one layer's tensor in its stored layout (no canonical transposes, no layer stack)."""
        source = x
        # The stored axis 1 first, while the tensor is small: gathers and scatters across columns
        # cost several times those of whole rows, which axis 0 then copies.
        for axis in range(x.dim() - 1, -1, -1):
            x = self.expand_axis(spec, x, axis, layer)
        if spec.norm_gain and self.norm_scale != 1.0:
            x = x * self.norm_scale
        return x.contiguous() if x is not source else x.clone()

    def expand_axis(self, spec: TensorSpec, x: torch.Tensor, axis: int, layer: int) -> torch.Tensor:
        """Widen stored axis ``axis`` of one layer's tensor ``x`` (``x`` itself if that axis keeps its size)."""
        for k, dim in enumerate(spec.dims):
            if dim is None or stored_axis(spec, k, x.dim()) != axis:
                continue
            space, side = dim[0], self._side(dim[1])
            if "+" in space:
                parts = torch.split(x, [self.small_dims[s] for s in spec.fused], dim=axis)
                x = torch.cat([self.expanders[s].row_plan(side).expand(p, axis, layer)
                               for s, p in zip(spec.fused, parts)], dim=axis)
            else:
                x = self.expanders[space].row_plan(side).expand(x, axis, layer)
        return x

    def exact_axis(self, spec: TensorSpec, axis: int, layer: int, dtype: torch.dtype) -> bool:
        """Whether ``expand_axis`` on ``dtype`` values may run in ``dtype`` (``RowPlan.exact_in``)."""
        for k, dim in enumerate(spec.dims):
            if dim is not None and stored_axis(spec, k, 2) == axis:
                side = self._side(dim[1])
                if not all(self.expanders[s].row_plan(side).exact_in(layer, dtype) for s in dim[0].split("+")):
                    return False
        return True

    def axis_plan(self, spec: TensorSpec, axis: int, ndim: int) -> RowPlan | None:
        """The row plan that widens stored axis ``axis`` (None if it keeps its size); a fused axis
        (several spaces side by side) has none and is refused."""
        for k, dim in enumerate(spec.dims):
            if dim is not None and stored_axis(spec, k, ndim) == axis:
                if "+" in dim[0]:
                    raise ValueError(f"{spec.name}: axis {axis} is fused")
                return self.expanders[dim[0]].row_plan(self._side(dim[1]))
        return None


def stored_axis(spec: TensorSpec, k: int, ndim: int) -> int:
    """The axis of a stored tensor that holds the spec's logical dimension ``k`` ((out, in) order)."""
    return (1 - k) if (spec.stored_transposed and ndim == 2) else k


def _runs(src: torch.Tensor, skip: torch.Tensor, limit: int) -> list[list[tuple[int, int, int]]] | None:
    """``src`` (L, d2) as runs of consecutive source units per layer, leaving out the positions
    ``skip`` (mean and dense rows, written separately); None if any layer needs more than
    ``limit`` runs (random copies, as net2net draws them)."""
    skipped = set(skip.tolist())
    out = []
    seen: dict[bytes, list[tuple[int, int, int]]] = {}  # layers with the same sources share their runs
    for row_tensor in src:
        key = row_tensor.numpy().tobytes()
        if key in seen:
            out.append(seen[key])
            continue
        row = row_tensor.tolist()
        runs: list[tuple[int, int, int]] = []
        for i, unit in enumerate(row):
            if i in skipped:
                continue
            if runs and runs[-1][0] + runs[-1][2] == i and runs[-1][1] + runs[-1][2] == unit:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
            elif len(runs) == limit:
                return None
            else:
                runs.append((i, unit, 1))
        seen[key] = runs
        out.append(runs)
    return out


class _LayerReader:
    """``layers[j]``: small layer ``j`` of one tensor, read when asked for (not all up front)."""

    def __init__(self, read: Callable[[str], torch.Tensor], full: str, count: int):
        self.read, self.full, self.count = read, full, count

    def __getitem__(self, j: int) -> torch.Tensor:
        return self.read(self.full.format(i=j))


def _mix_layers(weights: torch.Tensor, layers) -> torch.Tensor:
    """sum_j weights[j] * layers[j], without arithmetic when a large layer copies one small layer."""
    nonzero = weights.nonzero().flatten().tolist()
    if len(nonzero) == 1 and float(weights[nonzero[0]]) == 1.0:
        return layers[nonzero[0]]
    if not nonzero:
        return torch.zeros_like(layers[0])
    first = layers[nonzero[0]]
    dtype = torch.promote_types(first.dtype, torch.float32)  # a mix of bf16 layers is summed in fp32
    out = first.to(dtype) * weights[nonzero[0]].to(dtype)
    for j in nonzero[1:]:
        out.add_(layers[j].to(dtype), alpha=float(weights[j]))
    return out


def _key(name: str) -> str:
    return name.replace(".", "__").replace("{i}", "L")
