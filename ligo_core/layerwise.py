"""Run the large model with its weights made by the growth operator one module at a time.

Fitting LiGO through ``operator.materialise`` keeps every large weight, and its gradient, alive at
once: about ten times the target's fp32 size. Here the large model (a skeleton whose parameters
are on the meta device) runs its own forward, and each block (``transformer.h.3``,
``model.layers.3``, ``bert.encoder.layer.3``: the part of the family's tensor names up to ``{i}``)
and each other module that owns weights (embeddings, final norm, LM head) gets its weights from
the small model and the operator just in time, inside a non-reentrant
``torch.utils.checkpoint`` region. The region frees them when the module returns, and the backward
pass recomputes them (and the block's activations) when it reaches the module, as activation
checkpointing does. A fitting step thus holds the small model, the operator and its optimiser
state, the block inputs, and one large block with its activations and weight gradients.

The model's own forward still does everything else (position ids, rotary embeddings, attention
masks, the tied head), so every family of ``ligo_core/families.py`` runs unchanged: the only
family knowledge used is the tensor table. Under ``no_grad`` (held-out scoring) the regions are
plain calls, and each module's weights are freed as soon as it returns.

The module's ``forward`` is swapped for a wrapper while ``active()`` is entered (the way
accelerate's hooks do it) and restored on exit; the wrapper sets the module's own parameters to
the made tensors for the call and puts the meta ones back.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ligo_core.families import TensorSpec
from ligo_core.operator import GrowthOperator


class LayerwiseModel:
    """A stripped large model whose weights come from ``operator(small_state)`` module by module.

    ``names`` maps spec names to full tensor names (``Layout.names``); ``offsets`` (large name ->
    fixed tensor) are added to the operator's output, as in ``fit_operator``.
    """

    def __init__(self, model: nn.Module, operator: GrowthOperator, small_state: dict[str, torch.Tensor],
                 names: dict[str, str], offsets: Mapping[str, torch.Tensor] | None = None):
        self.model, self.operator, self.small = model, operator, small_state
        self.offsets = offsets or {}
        self.regions = _regions(model, operator.specs, names, operator.large_layers)

    def weights(self, region: list[tuple[str, TensorSpec, str, int | None]]) -> dict[str, torch.Tensor]:
        """The tensors of one region, by name relative to its module."""
        out = {}
        for relative, spec, full, layer in region:
            tensor = self.operator.materialise_tensor(spec, self.small, full, layer)
            large = full if layer is None else full.format(i=layer)
            if large in self.offsets:
                tensor = tensor + self.offsets[large].to(tensor.dtype)
            out[relative] = tensor
        return out

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        """While entered, calling the model runs it layer by layer (use_cache off: a recomputed block
        must not append to a key/value cache twice)."""
        originals = {}
        config = self.model.config
        had_cache, use_cache = hasattr(config, "use_cache"), getattr(config, "use_cache", None)
        try:
            config.use_cache = False
            for path, region in self.regions.items():
                module = self.model.get_submodule(path)
                originals[path] = module.__dict__.get("forward")
                module.forward = _wrapped(self, module, module.forward, region)
            yield self.model
        finally:
            for path, forward in originals.items():
                module = self.model.get_submodule(path)
                if forward is None:
                    del module.forward
                else:
                    module.forward = forward
            if had_cache:
                config.use_cache = use_cache
            else:
                del config.use_cache


def _wrapped(runner: LayerwiseModel, module: nn.Module, forward, region):
    slots = [(module.get_submodule(r.rpartition(".")[0]) if "." in r else module, r.rpartition(".")[2])
             for r, *_ in region]

    def run(*args, **kwargs):
        weights = runner.weights(region)
        saved = [owner._parameters[leaf] for owner, leaf in slots]
        try:
            for (owner, leaf), (relative, *_rest) in zip(slots, region):
                owner._parameters[leaf] = weights[relative]  # a plain tensor for this call only
            return forward(*args, **kwargs)
        finally:
            for (owner, leaf), param in zip(slots, saved):
                owner._parameters[leaf] = param

    def call(*args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(run, *args, use_reentrant=False, **kwargs)
        return run(*args, **kwargs)

    return call


def _regions(model: nn.Module, specs: list[TensorSpec], names: dict[str, str], layers: int):
    """module path -> [(parameter name relative to it, spec, full name with {i}, large layer or None)].

    Blocks are the prefixes of the per-layer names up to ``{i}``; every other parameter belongs to
    the module that owns it. Tied and aliased parameters (a tied LM head, BERT's decoder bias) are
    found by identity and made from the tensor they share.
    """
    by_spec = {names[s.name]: s for s in specs}
    blocks = {full.split("{i}")[0] + "{i}" for full, s in by_spec.items() if s.per_layer}
    if len(blocks) > 1:
        raise ValueError(f"per-layer tensors live under more than one block list: {sorted(blocks)}")
    block = blocks.pop() if blocks else None
    canonical = {}
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, p in params.items():
        if name in by_spec:
            canonical[id(p)] = name
    regions: dict[str, list] = {}
    for name, p in params.items():
        if block is not None and name.startswith(block.split("{i}")[0]):
            head, _, rest = name[len(block.split("{i}")[0]):].partition(".")
            layer = int(head)
            full = block + "." + rest
            if full not in by_spec:
                raise ValueError(f"the model's tensor {name!r} has no row in the family table")
            regions.setdefault(block.format(i=layer), []).append((rest, by_spec[full], full, layer))
            continue
        source = name if name in by_spec else canonical.get(id(p))
        if source is None:
            raise ValueError(f"the model's tensor {name!r} has no row in the family table")
        owner, _, leaf = name.rpartition(".")
        regions.setdefault(owner, []).append((leaf, by_spec[source], source, None))
    return _outermost(regions)


def _outermost(regions: dict[str, list]) -> dict[str, list]:
    """Fold a region into the region of a module that contains it (BERT's MLM head owns a bias and
    holds the layers that own the rest): the backward pass recomputes the outer module after
    ``active()`` has ended, when inner wrappers are gone, so the outer one must make them all."""
    merged: dict[str, list] = {}
    for path in sorted(regions, key=lambda p: (p.count(".") if p else -1, p)):
        outer = next((o for o in merged if o == "" or path.startswith(o + ".")), None)
        if outer is None:
            merged[path] = list(regions[path])
        else:
            inner = path[len(outer) + 1:] if outer else path
            merged[outer] += [(f"{inner}.{leaf}", *rest) for leaf, *rest in regions[path]]
    return merged
