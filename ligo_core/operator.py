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

from dataclasses import dataclass

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


class Expander(nn.Module):
    def __init__(self, init: ExpanderInit):
        super().__init__()
        self.register_buffer("order", init.order.clone(), persistent=True)
        self.top_e = nn.Parameter(init.top_e.clone().float())
        self.c_e = nn.Parameter(init.c_e.clone().float())
        self.top_f = nn.Parameter(init.top_f.clone().float())
        self.c_f = nn.Parameter(init.c_f.clone().float())

    @property
    def d1(self) -> int:
        return self.top_e.shape[-1]

    @property
    def d2(self) -> int:
        return self.order.shape[0]

    def apply(self, x: torch.Tensor, side: str) -> torch.Tensor:
        """Expand ``x`` of shape (L, d1, m) along dim 1 to (L, d2, m)."""
        top, c = (self.top_e, self.c_e) if side == "E" else (self.top_f, self.c_f)
        top, c = top.to(x.dtype), c.to(x.dtype)
        if top.shape[0] != x.shape[0]:  # a global expander applied to every layer
            top = top.expand(x.shape[0], -1)
            c = c.expand(x.shape[0], -1, -1)
        stacked = torch.cat([top.unsqueeze(-1) * x, torch.bmm(c, x)], dim=1)
        return stacked.index_select(1, self.order)


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
        expanders: dict[str, ExpanderInit],
        depth: dict[str, torch.Tensor],
        norm_scale: float,
        head_tied: bool,
        small_dims: dict[str, int],
        large_layers: int,
    ):
        super().__init__()
        self.family = family
        self.specs = specs
        self.expanders = nn.ModuleDict({name: Expander(init) for name, init in expanders.items()})
        # Depth coefficients, one (L2, L1) matrix per layer tensor; keys may not contain dots.
        self.depth = nn.ParameterDict({_key(n): nn.Parameter(w.clone().float()) for n, w in depth.items()})
        self.norm_scale = norm_scale
        self.head_tied = head_tied
        self.small_dims = small_dims
        self.large_layers = large_layers

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _side(self, side: str) -> str:
        if side == "H":
            return "F" if self.head_tied else "E"
        return side

    def _expand_dim(self, x: torch.Tensor, dim: tuple[str, str] | None, spec: TensorSpec) -> torch.Tensor:
        """Expand dim 1 of (L, d1, m)."""
        if dim is None:
            return x
        space, side = dim
        side = self._side(side)
        if "+" in space:  # fused projections (GPT-2's c_attn): expand each part with its own space
            sizes = [self.small_dims[s] for s in spec.fused]
            parts = torch.split(x, sizes, dim=1)
            return torch.cat([self.expanders[s].apply(p, side) for s, p in zip(spec.fused, parts)], dim=1)
        return self.expanders[space].apply(x, side)

    def expand_tensor(self, spec: TensorSpec, x: torch.Tensor) -> torch.Tensor:
        """Grow one tensor; ``x`` is the stack of all small layers for a per-layer tensor."""
        per_layer = spec.per_layer
        if per_layer:
            w = self.depth[_key(spec.name)].to(x.dtype)
            x = torch.einsum("lj,j...->l...", w, x)
        vector = x.dim() == (2 if per_layer else 1)
        y = _canonical(x, spec, per_layer)
        y = self._expand_dim(y, spec.dims[0], spec)
        if len(spec.dims) == 2:
            y = self._expand_dim(y.transpose(1, 2), spec.dims[1], spec).transpose(1, 2)
        if spec.norm_gain:
            y = y * self.norm_scale
        return _stored(y, spec, per_layer, vector)

    def materialise(self, small: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
        """The large model's tensors from the small model's.

        ``names`` maps each spec name (relative, with ``{i}``) to its full name in the checkpoint.
        Per-layer tensors come back as one tensor per large layer.
        """
        large: dict[str, torch.Tensor] = {}
        for spec in self.specs:
            full = names[spec.name]
            if spec.per_layer:
                stack = torch.stack([small[full.format(i=j)] for j in range(self.depth[_key(spec.name)].shape[1])])
                grown = self.expand_tensor(spec, stack)
                for layer in range(self.large_layers):
                    large[full.format(i=layer)] = grown[layer]
            else:
                large[full] = self.expand_tensor(spec, small[full])
        return large


def _key(name: str) -> str:
    return name.replace(".", "__").replace("{i}", "L")
