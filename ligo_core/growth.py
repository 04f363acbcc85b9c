"""Grow a model in memory: lay out its tensors, build the operator, fit it (LiGO), materialise."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from ligo_core import sharding
from ligo_core.catalog import (
    DEFAULT_FIT_LR,
    DEFAULT_LIGO_INIT,
    DEFAULT_NOISE,
    check_growth_options,
    default_spread,
)
from ligo_core.errors import CheckpointError, GrowthCancelled, TargetError
from ligo_core.families import Family, TensorSpec
from ligo_core.fit_guard import TOLERANCE, FitGuard, check_every, guard_slice
from ligo_core.layerwise import LayerwiseModel
from ligo_core.objective import heldout_loss, loss_terms, tokenizer_info
from ligo_core.operator import GrowthOperator
from ligo_core.rowblocks import fixed_tensors
from ligo_core.separation import Separation
from ligo_core.strategies import build_operator
from ligo_core.targets import check_growth, family_of, sizes_of
from ligo_core.training import default_device, lr_at

IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "position_ids", "rotary_emb.inv_freq")


@dataclass
class Layout:
    """Which family tensors this checkpoint has, and their full names."""

    family: Family
    specs: list[TensorSpec]
    names: dict[str, str]  # spec name -> full name (with {i})
    prefix: str
    has_head: bool
    head_tied: bool
    dropped: list[str]  # tensors of the checkpoint that the family table does not know

    @property
    def embedding_name(self) -> str:
        return self.prefix + self.family.embedding


def _tied(config: PretrainedConfig) -> bool:
    return bool(getattr(config, "tie_word_embeddings", True))


def plan_layout(config: PretrainedConfig, shapes: dict[str, tuple[int, ...]]) -> Layout:
    """Match a checkpoint's tensor names and shapes against its family's table."""
    family = family_of(config)
    sizes = sizes_of(config)
    prefix = next((p for p in family.base_prefixes if p + family.embedding in shapes), None)
    if prefix is None:
        raise CheckpointError(f"no {family.embedding!r} tensor: the weights do not belong to a {family.name} model")
    tied = _tied(config)
    head_names = {s.name for s in family.head}
    has_head = prefix != "" or any(n in shapes for n in head_names)
    specs, names = [], {}
    candidates = [(s, prefix + s.name) for s in family.base]
    if has_head:
        candidates += [(s, s.name) for s in family.head if not (tied and s.name == family.tied_head)]
    for spec, full in candidates:
        probe = full.format(i=0)
        if probe not in shapes:
            if spec.optional or (spec.name in head_names and not prefix):
                continue
            raise CheckpointError(f"tensor {probe!r} is missing: the weights do not match the {family.name} config")
        specs.append(spec)
        names[spec.name] = full
    _check_shapes(family, specs, names, shapes, sizes)
    known = {names[s.name].format(i=i) for s in specs for i in range(sizes["layers"] if s.per_layer else 1)}
    known |= set(family.aliases)
    if tied and has_head:
        known.add(family.tied_head)
    dropped = sorted(k for k in shapes if k not in known and not k.endswith(IGNORED_SUFFIXES))
    return Layout(family, specs, names, prefix, has_head, tied and has_head, dropped)


def _check_shapes(family, specs, names, shapes, sizes):
    dims = {
        "res": sizes["hidden"], "q": sizes["heads"] * sizes["head_dim"],
        "k": sizes["kv_heads"] * sizes["head_dim"], "v": sizes["kv_heads"] * sizes["head_dim"],
        "ffn": sizes["ffn"],
    }
    for spec in specs:
        layers = range(sizes["layers"]) if spec.per_layer else [0]
        for i in layers:
            full = names[spec.name].format(i=i)
            if full not in shapes:
                raise CheckpointError(f"tensor {full!r} is missing: the config says {sizes['layers']} layers")
            expected = []
            for d in spec.dims:
                expected.append(None if d is None else sum(dims[s] for s in d[0].split("+")))
            if spec.stored_transposed:
                expected.reverse()
            got = shapes[full]
            if len(got) != len(expected) or any(e is not None and e != g for e, g in zip(expected, got)):
                want = "x".join("?" if e is None else str(e) for e in expected)
                raise CheckpointError(
                    f"tensor {full!r} has shape {tuple(got)}, but the config implies {want}"
                )
        if spec.per_layer and names[spec.name].format(i=sizes["layers"]) in shapes:
            raise CheckpointError(f"the weights have more layers than the config's {sizes['layers']}")


def _strip_parameters(model: nn.Module) -> None:
    """Free the model's parameters (keep buffers); tied parameters stay tied."""
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in replaced:
                replaced[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            module._parameters[name] = replaced[id(p)]


def _move_buffers(model: nn.Module, device: torch.device) -> None:
    for module in model.modules():
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = b.to(device)


def load_grown_weights(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> PreTrainedModel:
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # assign=True replaced tied parameters on one side only
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise AssertionError(f"grown model is missing tensors: {missing[:5]}")
    return model


@dataclass
class GrownOperator:
    """A fitted (or fixed) operator with what it reads, for writing the large model tensor by tensor."""

    operator: GrowthOperator
    small_state: dict[str, torch.Tensor]  # fp32, by full name
    layout: Layout
    offsets: Mapping[str, torch.Tensor]  # added to a fitted operator's output (ligo_core/separation.py)
    config: PretrainedConfig  # the large config (norm epsilon rescaled)
    moves: Separation | None = None  # a fixed operator's: each tensor moved as it is made

    def tensors(self, dtype: torch.dtype, allocate=None) -> Iterator[tuple[TensorSpec, int, str, torch.Tensor]]:
        """The large tensors in spec order, as they are handed over (``stream.stream_weights``)."""
        if self.moves is not None:
            yield from fixed_tensors(self.operator, self.small_state.__getitem__, self.layout.names, self.moves,
                                     dtype, allocate)
            return
        for spec, layer, name, tensor in self.operator.iter_fixed(self.small_state.__getitem__, self.layout.names):
            yield spec, layer, name, tensor.add_(self.offsets[name]) if name in self.offsets else tensor


CLIP_NORM = 1.0  # the operator's gradient norm is clipped to this before each AdamW step


def fit_warmup(steps: int) -> int:
    """Warm-up steps: 10% of the fit, and never fewer than 2, so that no fit starts with a full-rate
    AdamW step (which moves every operator entry by the learning rate at once)."""
    return min(steps, max(2, steps // 10))


def fit_operator(
    operator: GrowthOperator,
    skeleton: PreTrainedModel,
    small_state: dict[str, torch.Tensor],
    layout: Layout,
    batches: Iterator[torch.Tensor],
    steps: int,
    lr: float,
    info: dict,
    device: torch.device,
    seed: int,
    progress: Callable[[dict], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    accumulate: int = 1,
    offsets: dict[str, torch.Tensor] | None = None,
    guard: FitGuard | None = None,
    layerwise: bool = True,
) -> list[tuple[int, float]]:
    """Train only the operator on the large model's loss; the small weights stay frozen.

    ``layerwise`` (the default) runs the large model block by block, each block's weights made from
    the small model and the operator just in time and made again in the backward pass
    (ligo_core/layerwise.py): no more than one large block is alive. ``layerwise=False`` is the
    first implementation, kept as the reference the tests and bench/scale_fit.py compare with: the
    whole large model is materialised and run with ``functional_call``.

    Under torch.distributed (ligo_core/parallel.py) every rank draws the same global batch, scores
    its own slice of it, and the operator's gradients are summed over the ranks: the same step as
    one process on the whole batch.

    ``offsets`` (fixed tensors, by large name) are added to the operator's output, so the loss is
    that of the model that will be written (copies moved apart, see ligo_core/separation.py).

    With ``accumulate`` > 1 each step draws that many batches and their gradients add up. On the
    reference path the operator is applied once per step and one backward pass carries the
    gathered gradients of the large weights through it.

    ``guard`` (ligo_core/fit_guard.py) scores held-out loss as the fit goes, stops it when it
    diverges and leaves the operator at the best state it saw (the start, if nothing beat it).
    """
    if accumulate < 1:
        raise ValueError(f"accumulate must be at least 1, got {accumulate}")
    rank, world = data_parallel_rank()
    sharded = world > 1 and layerwise
    if sharded:  # each rank keeps 1/N of the per-layer expanders (ligo_core/sharding.py)
        fsdp_root = sharding.shard(operator, device)
    decay = [p for n, p in operator.named_parameters() if n.endswith(("c_e", "c_f"))]
    rest = [p for n, p in operator.named_parameters() if not n.endswith(("c_e", "c_f"))]
    groups = [{"params": kind, "weight_decay": wd} for params, wd in ((decay, 0.01), (rest, 0.0))
              for kind in sharding.by_kind(params) if kind]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))
    mask_gen = torch.Generator().manual_seed(seed + 1 + 7919 * rank)  # MLM masks: each rank its own
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    runner = LayerwiseModel(skeleton, operator, small_state, layout.names, offsets) if layerwise else None
    history = []
    skeleton.train()

    def batch_loss(params: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, float]:
        """(loss to differentiate, its value): this rank's token losses over the global batch's tokens."""
        batch = rank_slice(next(batches), rank, world).to(device)
        with autocast, (runner.active() if runner is not None else contextlib.nullcontext()):
            total, count = loss_terms(skeleton, batch, layout.family.objective, info, mask_gen, params,
                                      layout.embedding_name)
        shown = total.detach().double()
        if world > 1:
            sums = torch.stack([shown, torch.tensor(float(count), dtype=torch.float64, device=shown.device)])
            dist.all_reduce(sums)
            shown, count = sums[0], int(sums[1])
        count = max(count, 1)
        return total / count, float(shown) / count

    for step in range(steps):
        if should_cancel is not None and should_cancel():
            raise GrowthCancelled()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=fit_warmup(steps))  # warm-up sized for the fit
        optimizer.zero_grad(set_to_none=True)
        value = 0.0
        if runner is not None:
            for _ in range(accumulate):
                loss, shown = batch_loss(None)
                (loss / accumulate).backward()
                value += shown / accumulate
        else:
            with autocast:
                large = operator.materialise(small_state, layout.names)
                for name, offset in (offsets or {}).items():
                    large[name] = large[name] + offset
            if accumulate == 1:
                loss, value = batch_loss(large)
                loss.backward()
            else:
                leaves = {k: v.detach().requires_grad_() for k, v in large.items()}
                for _ in range(accumulate):
                    loss, shown = batch_loss(leaves)
                    (loss / accumulate).backward()
                    value += shown / accumulate
                used = [k for k, leaf in leaves.items() if leaf.grad is not None]
                torch.autograd.backward([large[k] for k in used], [leaves[k].grad for k in used])
                del leaves
            del large
        if world > 1:
            sharding.reduce_gradients(operator, world)
        sharding.clip_grad_norm(operator.parameters(), CLIP_NORM)
        optimizer.step()
        history.append((step + 1, value))
        if progress:
            progress({"stage": "fitting", "step": step + 1, "total": steps, "loss": value})
        if guard is not None and rank_zeros(guard.after_step(step + 1, value, operator, last=step + 1 == steps)):
            break  # rank 0's decision: every rank leaves the loop at the same step
    # The moments and gradients go before anything is gathered or loaded: not held beside the whole operator.
    optimizer.zero_grad(set_to_none=True)
    optimizer.state.clear()
    del optimizer
    if guard is not None:
        guard.restore_best(operator)  # every rank kept the same states: they saw rank 0's scores
    if sharded:
        sharding.gather(operator)
        del fsdp_root
    return history


def rank_zeros(value):
    """Rank 0's ``value`` on every rank (itself outside torch.distributed): the ranks must make the
    same choices (a guard's scores, when to stop) even where their own numbers round differently."""
    if data_parallel_rank()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, 0)
    return box[0]


def data_parallel_rank() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def wait_for_ranks() -> None:
    """A barrier under torch.distributed; nothing otherwise."""
    if data_parallel_rank()[1] > 1:
        dist.barrier()


def rank_slice(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of the global batch (contiguous, sizes differing by at most one)."""
    if world == 1:
        return batch
    if batch.shape[0] < world:
        raise TargetError(f"a fitting batch of {batch.shape[0]} sequences cannot be split over {world} processes; "
                          f"use a batch size of at least {world}")
    return batch.tensor_split(world)[rank]


def _moved(params: dict[str, torch.Tensor], offsets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``params`` with the copies moved apart (new tensors; ``params`` is left as it is)."""
    return {k: v + offsets[k] if k in offsets else v for k, v in params.items()}


def bare_model_refusal(model: PreTrainedModel | type) -> str:
    name = model.__name__ if isinstance(model, type) else type(model).__name__
    return (
        f"strategy 'ligo' fits the operator on the model's own language-model loss, and this checkpoint "
        f"({name}) is a bare encoder or decoder with no LM head, so there is no such loss to fit "
        "(an untrained head would make the fit follow a number that says nothing about the model). Use a "
        "fixed strategy: 'preserve' (keeps the function; exact for pre-norm models, and for BERT-style "
        "models at integer width multiples and the same depth), 'stack' or 'interpolate'; or grow the "
        "checkpoint saved with its head (e.g. BertForMaskedLM, not BertModel)"
    )


def _scaled_eps(config: PretrainedConfig, family: Family, norm_scale: float) -> PretrainedConfig:
    """A wider norm over mean/zero-padded units sees its variance scaled by ``norm_scale**2``;
    scaling its epsilon the same way keeps the function exact."""
    if norm_scale == 1.0:
        return config
    config = copy.deepcopy(config)
    setattr(config, family.eps_key, getattr(config, family.eps_key) * norm_scale**2)
    return config


def start_operator(
    small_config: PretrainedConfig,
    layout: Layout,
    target_config: PretrainedConfig,
    *,
    strategy: str,
    seed: int = 0,
    noise: float = DEFAULT_NOISE,
    spread: float | None = None,
    ligo_init: str = DEFAULT_LIGO_INIT,
    planned: bool = False,
) -> tuple[GrowthOperator, PretrainedConfig]:
    """The strategy's initial operator and the large config it writes (norm epsilon rescaled), from
    the configs and the layout alone: no tensor of the small model is needed."""
    check_growth_options(strategy, ligo_init, noise, spread)
    spread = default_spread(strategy) if spread is None else spread
    check_growth(small_config, target_config)
    torch.manual_seed(seed)
    operator = build_operator(
        strategy, layout.family, layout.specs, sizes_of(small_config), sizes_of(target_config), layout.head_tied,
        seed=seed, noise=noise, ligo_init=ligo_init, spread=spread, planned=planned,
    )
    return operator, _scaled_eps(target_config, layout.family, operator.norm_scale)


def grow_model(
    small_model: PreTrainedModel,
    target_config: PretrainedConfig,
    *,
    strategy: str = "ligo",
    fit_steps: int = 100,
    train_batches: Iterator[torch.Tensor] | None = None,
    seed: int = 0,
    lr: float | None = None,
    device: str | torch.device | None = None,
    progress: Callable[[dict], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    tokenizer=None,
    noise: float = DEFAULT_NOISE,
    spread: float | None = None,
    heldout: torch.Tensor | None = None,
    eval_batch_size: int = 16,
    ligo_init: str = DEFAULT_LIGO_INIT,
    accumulate: int = 1,
    stream: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel | None, dict]:
    """Grow ``small_model`` to ``target_config`` with a strategy; returns (large model, info).

    With ``heldout`` token sequences, ``info`` also holds the held-out loss of a randomly
    initialised large model and of the grown model before and after fitting, and LiGO's fit is
    guarded (ligo_core/fit_guard.py): the model returned is never worse on ``heldout`` than the
    fit's start. ``spread`` None takes the strategy's default (``default_spread``).

    ``stream`` without ``heldout``: no large model is built; the model returned is None and
    ``info["grown"]`` holds what ``ligo_core.stream`` needs to write it tensor by tensor.

    ``dtype``: the dtype the grown model is written in. A fixed strategy makes its tensors in it
    (ligo_core/rowblocks.py), so the model scored is the one handed over, bit for bit what a
    streamed grow writes; the model returned holds them in fp32.
    """
    if accumulate < 1:
        raise TargetError(f"accumulate must be at least 1, got {accumulate}")
    device = default_device(device)
    state = {k: v.detach() for k, v in small_model.state_dict().items()}
    layout = plan_layout(small_model.config, {k: tuple(v.shape) for k, v in state.items()})
    if strategy == "ligo" and fit_steps > 0 and not layout.has_head:
        raise TargetError(bare_model_refusal(small_model))
    if strategy == "ligo" and fit_steps > 0 and train_batches is None:
        raise TargetError("strategy 'ligo' needs training batches to fit the operator")
    operator, target_config = start_operator(small_model.config, layout, target_config, strategy=strategy, seed=seed,
                                             noise=noise, spread=spread, ligo_init=ligo_init)
    small_state = {k: v.to(device=device, dtype=torch.float32) for k, v in state.items()}
    mlm_info = tokenizer_info(tokenizer, small_model.config)
    objective = layout.family.objective
    skeleton = type(small_model)(target_config)
    losses: dict[str, float | None] = {"random": None, "before_fit": None, "after_fit": None}

    def evaluate(tokens=heldout, **kwargs) -> float:
        return heldout_loss(skeleton, tokens, objective, mlm_info, eval_batch_size, device=device,
                            embedding_name=layout.embedding_name, **kwargs)

    if heldout is not None:
        if progress:
            progress({"stage": "evaluating", "step": 0, "total": 1, "loss": None})
        skeleton.to(device)
        losses["random"] = evaluate()
    _strip_parameters(skeleton)
    _move_buffers(skeleton, device)
    operator.to(device)
    with torch.no_grad():
        initial = operator.materialise(small_state, layout.names)
        if heldout is not None:
            losses["before_fit"] = evaluate(params=initial)
    # Copies moved apart (ligo_core/separation.py): LiGO's fit trains with them in place, as offsets; a
    # fixed strategy moves each tensor once it is made, drawing what a streamed grow draws.
    separation = Separation(operator, operator.spread, torch.Generator().manual_seed(seed + 2))
    offsets = separation.offsets(initial, layout.names) if strategy == "ligo" else {}
    moves = None if strategy == "ligo" else separation
    info: dict = {
        "strategy": strategy,
        "operator_parameters": operator.num_parameters(),
        "fit_steps": 0,
        "fit_history": [],
        "fit_seconds": 0.0,
        "dropped_tensors": layout.dropped,
        "family": layout.family.name,
        "ligo_init": ligo_init if strategy == "ligo" else None,
        "noise": operator.noise,
        "spread": operator.spread,
        "heldout_loss": losses,
        "norm_eps_scale": operator.norm_scale**2,
    }
    guard = None
    if strategy == "ligo" and fit_steps > 0:
        lr = lr if lr is not None else DEFAULT_FIT_LR
        if heldout is not None:
            # The fit's start is the grown model as fit_steps=0 would write it: copies moved apart
            # (in place: ``initial`` is not used again on this path).
            for name, offset in offsets.items():
                initial[name].add_(offset)
            losses["fit_start"] = evaluate(params=initial) if offsets else losses["before_fit"]

            scorer = LayerwiseModel(skeleton, operator, small_state, layout.names, offsets)

            def score(op: GrowthOperator) -> float:  # ``op`` is ``operator``: scored a block at a time
                with torch.no_grad(), scorer.active():
                    return rank_zeros(evaluate(guard_slice(heldout)))

            guard = FitGuard(score, every=check_every(fit_steps))
            guard.start(operator)
        initial = None  # the fitted operator's tensors replace it; not held through the fit
        started = time.perf_counter()
        history = fit_operator(
            operator, skeleton, small_state, layout, train_batches, fit_steps, lr, mlm_info, device, seed,
            progress, should_cancel, accumulate, offsets, guard,
        )
        # Steps run: fewer than asked when the guard stopped a diverging fit.
        info.update(fit_steps=len(history), fit_steps_requested=fit_steps, fit_history=history,
                    fit_seconds=time.perf_counter() - started, fit_lr=lr, fit_accumulate=accumulate,
                    fit_warmup=fit_warmup(fit_steps))
    if progress:
        progress({"stage": "materialising", "step": 0, "total": 1, "loss": None})
    if stream and heldout is None:
        # Nothing left to score: the caller writes the tensors one at a time (ligo_core/stream.py).
        info["grown"] = GrownOperator(operator, small_state, layout, offsets, target_config, moves)
        return None, info
    with torch.no_grad():
        if moves is not None:  # a fixed strategy: made as a streamed grow makes it, the same bits
            del initial
            large_state = {name: tensor.float() for _, _, name, tensor in
                           fixed_tensors(operator, small_state.__getitem__, layout.names, moves, dtype)}
        else:
            large_state = operator.materialise(small_state, layout.names) if info["fit_steps"] else initial
            del initial
        for name, offset in offsets.items():
            large_state[name].add_(offset)  # materialised tensors own their memory: no second copy
        if heldout is not None:
            changed = info["fit_steps"] or operator.spread  # the grown model differs from the initial operator's
            losses["after_fit"] = evaluate(params=large_state) if changed else losses["before_fit"]
        if guard is not None:
            if losses["after_fit"] > losses["fit_start"] + TOLERANCE:
                # The slice's best is worse on the whole held-out set: write the start instead.
                del large_state
                guard.fall_back(operator, losses["after_fit"], losses["fit_start"])
                large_state = _moved(operator.materialise(small_state, layout.names), offsets)
                losses["after_fit"] = losses["fit_start"]
            info["fit_guard"] = guard.summary()
        del offsets
    del operator
    large = load_grown_weights(skeleton, {k: v.contiguous() for k, v in large_state.items()})
    large.eval()
    return large, info
