"""The growth operator sharded over the data-parallel ranks with FSDP, for a fit one device cannot hold.

LiGO's operator for Llama 1B -> 8B has 3.5B values; with their gradients and AdamW's two moments
that is 56 GB before a single large layer is made, more than one 80 GB GPU holds beside the fit.
Under torch.distributed, ``fit_operator`` hands each large layer's expander values
(``ExpanderLayer``: the bulk of the operator) to torch's FSDP2 (``fully_shard``): every rank keeps
1/N of each layer's values, gradients and moments; a layer's values are all-gathered when that
layer is made (in the forward pass, and again when the backward pass recomputes it) and freed
after; their gradients are reduce-scattered. The residual-stream expander and the depth mixing,
small and used by every layer, stay whole on every rank and their gradients are all-reduced.

After the fit the values are gathered back into plain parameters on every rank: writing the model
reads whole expanders (row plans), and without gradients and moments the operator is a quarter of
its fitting size. The fit guard's snapshots (``snapshot``) keep each rank's shards on the CPU; the
start, taken before sharding, is whole, and ``load_state`` loads either kind.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from ligo_core.operator import Expander, ExpanderLayer, GrowthOperator

VALUES = ("top_e", "c_e", "top_f", "c_f")


class _Root(nn.Module):
    """One FSDP root over every sharded layer: the layers then share one communication context, so
    FSDP keeps one reduce-scatter input between layers, not one per layer until the backward pass
    ends (about half the per-layer values, whatever the number of ranks). Nothing runs through it
    but the one call that makes it the root."""

    def __init__(self, units: list[nn.Module]):
        super().__init__()
        self.units = nn.ModuleList(units)

    def forward(self) -> None:
        return None


def shard(operator: GrowthOperator, device: torch.device) -> nn.Module:
    """Shard every per-layer expander's layers over the ranks (in place); returns their FSDP root,
    to be kept until ``gather``."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = [unit for expander in _per_layer(operator) for unit in expander.layers]
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
        register_fsdp_forward_method(unit, "stacked")  # Expander.expand calls it, not forward
    root = _Root(units)
    fully_shard(root, mesh=mesh)
    root()  # FSDP takes the first module called for the root: this one, before any layer
    return root


def gather(operator: GrowthOperator) -> None:
    """Sharded layers back to plain ones holding the whole values, on every rank (a collective)."""
    for expander in _per_layer(operator):
        for i, unit in enumerate(expander.layers):
            if isinstance(unit.top_e, DTensor):
                expander.layers[i] = ExpanderLayer(*(unit.get_parameter(n).detach().full_tensor() for n in VALUES))
        expander._plans = {}


def reduce_gradients(operator: nn.Module, world: int) -> None:
    """Each rank's loss is its share of the global batch's: the ranks' gradients add up. FSDP averaged
    the sharded ones over the ranks (gloo has no pre-scaled sum); the whole ones are summed here."""
    for p in operator.parameters():
        if p.grad is None:
            continue
        if isinstance(p.grad, DTensor):
            p.grad.mul_(world)
        else:
            dist.all_reduce(p.grad)


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over sharded and whole gradients together: the norm of every rank's shard
    (summed over the ranks) and of the whole gradients (the same on every rank, counted once)."""
    parameters = [p for p in parameters if p.grad is not None]
    sharded = [p for p in parameters if isinstance(p.grad, DTensor)]
    whole = [p for p in parameters if not isinstance(p.grad, DTensor)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(whole, max_norm)
    shard_norm = torch.nn.utils.get_total_norm([p.grad for p in sharded]).full_tensor()
    whole_norm = torch.nn.utils.get_total_norm([p.grad for p in whole]) if whole else torch.zeros_like(shard_norm)
    total = torch.sqrt(shard_norm.square() + whole_norm.to(shard_norm.device).square())
    for group in (sharded, whole):  # parameters, not gradients: the clip reads each one's .grad
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def by_kind(parameters) -> tuple[list, list]:
    """(sharded, whole) parameters: AdamW's foreach kernels (its default on CUDA) refuse a list
    that mixes DTensors and plain tensors, so each kind needs its own parameter group."""
    parameters = list(parameters)
    return [p for p in parameters if isinstance(p, DTensor)], [p for p in parameters if not isinstance(p, DTensor)]


class Snapshot(dict):
    """An operator state on the CPU (``snapshot``); ``sharded`` names the entries that are this
    rank's shard of a sharded tensor, not the whole tensor."""

    sharded: frozenset = frozenset()


def snapshot(operator: nn.Module) -> Snapshot:
    """The operator's state copied to the CPU, a sharded tensor as this rank's shard: no collective,
    and 1/N of the host memory of a whole copy on each of N ranks."""
    state = Snapshot()
    for key, value in operator.state_dict().items():
        state[key] = (value.to_local() if isinstance(value, DTensor) else value).detach().to("cpu", copy=True)
    state.sharded = frozenset(k for k, v in operator.state_dict().items() if isinstance(v, DTensor))
    return state


def load_state(operator: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a state (a ``snapshot``, or whole tensors) into the operator, sharded or not. A whole
    tensor loaded into a sharded one is scattered from rank 0 (a collective: every rank loads the
    same state, as the guard's agreed choices make them)."""
    sharded = getattr(state, "sharded", frozenset())
    current = operator.state_dict()
    if current.keys() != state.keys():
        raise KeyError(f"operator state keys differ: {sorted(current.keys() ^ state.keys())[:5]}")
    with torch.no_grad():
        for key, value in current.items():
            if isinstance(value, DTensor):
                if key in sharded:
                    value.to_local().copy_(state[key])
                else:
                    mine = distribute_tensor(state[key].to(value.device), value.device_mesh, value.placements)
                    value.to_local().copy_(mine.to_local())
            elif key in sharded:
                raise ValueError(f"{key}: a shard cannot be loaded into the whole operator (gathered already)")
            else:
                value.copy_(state[key])


def _per_layer(operator: GrowthOperator) -> list[Expander]:
    return [e for e in operator.expanders.values() if isinstance(e, Expander) and len(e.layers) > 1]
