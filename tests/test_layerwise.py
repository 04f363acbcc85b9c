"""Layer-by-layer fitting (ligo_core/layerwise.py) is the same step as materialising the whole model."""

import pytest
import torch

from ligo_core.growth import _strip_parameters, fit_operator, plan_layout
from ligo_core.layerwise import LayerwiseModel
from ligo_core.objective import heldout_loss
from ligo_core.separation import separation_offsets
from ligo_core.strategies import build_operator
from ligo_core.targets import resolve_target, sizes_of
from tests.engine_fixtures import make_model, target_for

FAMILIES = ["gpt2", "llama", "llama-tied", "mistral", "qwen2", "bert", "roberta"]


def _setup(name, spread=2.0):
    small = make_model(name)
    target = resolve_target(target_for(name), small.config)
    state = {k: v.float() for k, v in small.state_dict().items()}
    layout = plan_layout(small.config, {k: tuple(v.shape) for k, v in state.items()})
    operator = build_operator("ligo", layout.family, layout.specs, sizes_of(small.config), sizes_of(target),
                              layout.head_tied, seed=0, spread=spread)
    with torch.no_grad():
        initial = operator.materialise(state, layout.names)
    offsets = separation_offsets(initial, operator, layout.names, spread, torch.Generator().manual_seed(2))
    skeleton = type(small)(target)
    _strip_parameters(skeleton)
    return small, state, layout, operator, offsets, skeleton, initial


def _one_step(name, layerwise, accumulate=1):
    small, state, layout, operator, offsets, skeleton, _ = _setup(name)
    info = {"mask_id": 4, "vocab_size": small.config.vocab_size, "special_ids": []}
    x = torch.randint(0, small.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(7)  # dropout stays on (training mode): both paths must draw the same masks
    grads = {}

    def after_step(event):  # the fit frees the gradients when it returns
        grads.update({n: p.grad.clone() for n, p in operator.named_parameters() if p.grad is not None})

    history = fit_operator(operator, skeleton, state, layout, iter([x, x.flip(0)]), 1, 1e-3, info,
                           torch.device("cpu"), 0, after_step, offsets=offsets, layerwise=layerwise,
                           accumulate=accumulate)
    assert all(p.grad is None for p in operator.parameters())
    return history[0][1], grads, skeleton


@pytest.mark.parametrize("name", FAMILIES)
def test_layerwise_step_has_the_same_loss_and_operator_gradient(name):
    loss_ref, grads_ref, _ = _one_step(name, layerwise=False)
    loss, grads, skeleton = _one_step(name, layerwise=True)
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    assert grads.keys() == grads_ref.keys() and len(grads) > 10
    for key, g in grads_ref.items():
        torch.testing.assert_close(grads[key], g, atol=1e-6, rtol=1e-4, msg=key)
    # the skeleton is left as it was: meta parameters, its own forward methods
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    assert not any("forward" in m.__dict__ for m in skeleton.modules())


def test_layerwise_accumulation_equals_the_reference_accumulation():
    loss_ref, grads_ref, _ = _one_step("gpt2", layerwise=False, accumulate=2)
    loss, grads, _ = _one_step("gpt2", layerwise=True, accumulate=2)
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    for key, g in grads_ref.items():
        torch.testing.assert_close(grads[key], g, atol=1e-6, rtol=1e-4, msg=key)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_layerwise_scoring_equals_scoring_the_materialised_model(name):
    small, state, layout, operator, offsets, skeleton, initial = _setup(name)
    tokens = torch.randint(0, small.config.vocab_size, (6, 16), generator=torch.Generator().manual_seed(3))
    params = {k: v + offsets[k] if k in offsets else v for k, v in initial.items()}
    reference = heldout_loss(skeleton, tokens, "clm", params=params, batch_size=4)
    runner = LayerwiseModel(skeleton, operator, state, layout.names, offsets)
    with torch.no_grad(), runner.active() as model:
        got = heldout_loss(model, tokens, "clm", batch_size=4)
    assert got == pytest.approx(reference, rel=1e-5)


def test_layerwise_holds_one_large_block_at_a_time():
    """Peak of materialised weight bytes during a step: one block, not the model."""
    small, state, layout, operator, offsets, skeleton, initial = _setup("gpt2", spread=0.0)
    runner = LayerwiseModel(skeleton, operator, state, layout.names)
    block = [p for p in runner.regions if p.endswith(".h.1")][0]
    sizes = {path: sum(initial[full if layer is None else full.format(i=layer)].numel()
                       for _, _, full, layer in region) for path, region in runner.regions.items()}
    assert sizes[block] < sum(v.numel() for v in initial.values()) / 4
    assert len([p for p in runner.regions if ".h." in p]) == 4  # every large layer is its own region
