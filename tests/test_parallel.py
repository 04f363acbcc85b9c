"""Data-parallel fitting: N gloo processes fit what one process fits on the same global batch."""

import functools
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from ligo_core import growth
from ligo_core.cli import main as cli_main
from ligo_core.errors import DataError, MemoryPlanError, TargetError
from ligo_core.fit_guard import FitGuard
from ligo_core.growth import _strip_parameters, fit_operator, plan_layout, rank_slice
from ligo_core.parallel import RankFailed, grow_parallel
from ligo_core.strategies import build_operator
from ligo_core.targets import resolve_target, sizes_of
from tests.engine_fixtures import make_model, target_for

STEPS, BATCH = 3, 6


# Held-out scores a guard sees (start, then after each step): it keeps step 2's operator for llama (a
# snapshot of each rank's shards) and the start for gpt2 (whole tensors, taken before sharding).
GUARD_SCORES = {"llama": [5.0, 4.0, 3.0, 3.5], "gpt2": [3.0, 3.4, 3.2, 3.3]}


def _fit(name: str, held: list | None = None, clip: float = 1.0):
    """A few fitting steps from a fixed start, guarded (``GUARD_SCORES``); returns (loss history,
    final operator state). ``held``: gets, after each step, (elements of the operator this rank
    holds, of the whole). ``clip``: the gradient norm clipped to (the default 1.0 is far above these
    fits' norms)."""
    growth.CLIP_NORM = clip
    small = make_model(name)
    target = resolve_target(target_for(name), small.config)
    target.resid_pdrop = target.embd_pdrop = target.attn_pdrop = 0.0  # dropout draws differ per process
    target.attention_dropout = 0.0
    state = {k: v.float() for k, v in small.state_dict().items()}
    layout = plan_layout(small.config, {k: tuple(v.shape) for k, v in state.items()})
    operator = build_operator("ligo", layout.family, layout.specs, sizes_of(small.config), sizes_of(target),
                              layout.head_tied, seed=0)
    skeleton = type(small)(target)
    _strip_parameters(skeleton)
    data = torch.randint(0, small.config.vocab_size, (STEPS, BATCH, 16), generator=torch.Generator().manual_seed(5))

    def count(event):
        if held is not None:
            held.append((sum(_local(p).numel() for p in operator.parameters()),
                         sum(p.numel() for p in operator.parameters())))

    scores = iter(GUARD_SCORES[name])
    guard = FitGuard(lambda op: next(scores))
    guard.start(operator)
    history = fit_operator(operator, skeleton, state, layout, iter(data), STEPS, 1e-3, {}, torch.device("cpu"), 0,
                           count, guard=guard)
    assert guard.best_step == (2 if name == "llama" else 0)
    return history, {k: v.clone() for k, v in operator.state_dict().items()}


def _rank(rank: int, world: int, port: int, name: str, out: str, clip: float) -> None:
    torch.set_num_threads(1)
    # AdamW's foreach kernels, its default on CUDA, refuse groups that mix sharded and whole parameters
    torch.optim.AdamW = functools.partial(torch.optim.AdamW, foreach=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        held = []
        history, state = _fit(name, held, clip)
        torch.save({"history": history, "state": state, "held": held}, out.replace(".pt", f"-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# llama's fit is clipped hard (its gradient norms are about 0.02-0.05), gpt2's not at all
@pytest.mark.parametrize("name,clip", [("gpt2", 1.0), ("llama", 0.005)])
def test_two_gloo_processes_fit_what_one_process_fits(name, clip, tmp_path):
    history, state = _fit(name, clip=clip)
    growth.CLIP_NORM = 1.0
    if clip < 1.0:  # the clip changes the fit: it is tested, not idle
        unclipped = _fit(name)[1]
        assert any((unclipped[k] - state[k]).abs().max() > 1e-4 for k in state)
    out = str(tmp_path / "rank.pt")
    mp.spawn(_rank, args=(2, _free_port(), name, out, clip), nprocs=2, join=True)
    got, other = torch.load(tmp_path / "rank-0.pt"), torch.load(tmp_path / "rank-1.pt")
    assert [s for s, _ in got["history"]] == [s for s, _ in history]
    for (_, a), (_, b) in zip(got["history"], history):
        assert a == pytest.approx(b, rel=1e-5)
    assert got["state"].keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(got["state"][key], value, atol=1e-6, rtol=1e-4, msg=key)
    # the guard's choice was loaded back: llama's fitted step 2, gpt2's start
    kept_start = all(torch.equal(v, build) for v, build in zip(state.values(), _start(name).values()))
    assert kept_start == (name == "gpt2")
    # Sharded while fitting (FSDP, ligo_core/sharding.py): each rank held its half of the per-layer
    # expanders, so together the two held the operator once over, plus the whole replicated part.
    whole = _replicated(name)
    assert len(got["held"]) == len(other["held"]) == STEPS
    for (mine, total), (theirs, _) in zip(got["held"], other["held"]):
        assert mine + theirs == total + whole and mine < 0.75 * total
    # and gathered back after it: both ranks hold the whole fitted operator
    for key in state:
        torch.testing.assert_close(other["state"][key], got["state"][key], atol=0, rtol=0, msg=key)


def _local(p):
    return p.to_local() if isinstance(p, DTensor) else p


def _replicated(name) -> int:
    """Elements not sharded: the residual-stream expander and the depth mixing."""
    operator = _start_operator(name)
    return sum(p.numel() for n, p in operator.named_parameters() if not n.startswith(("expanders.q", "expanders.k",
                                                                                       "expanders.v", "expanders.ffn")))


def _start_operator(name):
    small = make_model(name)
    target = resolve_target(target_for(name), small.config)
    layout = plan_layout(small.config, {k: tuple(v.shape) for k, v in small.state_dict().items()})
    return build_operator("ligo", layout.family, layout.specs, sizes_of(small.config), sizes_of(target),
                          layout.head_tied, seed=0)


def _start(name):
    return _start_operator(name).state_dict()


def test_each_rank_takes_its_slice_of_the_global_batch():
    batch = torch.arange(10).view(5, 2)
    parts = [rank_slice(batch, r, 2) for r in range(2)]
    assert torch.equal(torch.cat(parts), batch)
    with pytest.raises(TargetError, match="cannot be split over 8 processes"):
        rank_slice(batch, 0, 8)


def test_ligo_grow_nproc_2_writes_a_checkpoint(checkpoint_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    src = str(checkpoint_dir("gpt2"))
    out = tmp_path / "two"
    assert cli_main(["grow", src, "--target", target_for("gpt2"), "--out", str(out), "--nproc", "2", "--fit-steps", "2",
                     "--batch-size", "4", "--seq-len", "32", "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["processes"] == 2 and len(report["fit"]["loss_history"]) == 2
    assert json.loads((out / "growth_report.json").read_text())["processes"] == 2
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.n_layer == 4 and model.config.n_embd == 48


SITE_HOOK = """
import os
if os.environ.get("RANK") == "1":
    import ligo_core.growth as growth
    def broken(*args, **kwargs):
        raise RuntimeError("injected failure on rank 1")
    growth.fit_operator = broken
"""


def test_a_failed_rank_fails_the_run_with_its_error_and_writes_nothing(checkpoint_dir, tmp_path, monkeypatch):
    """Rank 1 fails as its fit starts, while rank 0 waits for it: the run fails with rank 1's error
    and leaves no output. (sitecustomize.py breaks rank 1 only, in the ranks' own interpreters.)"""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITE_HOOK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", ""), os.getcwd()]))
    out = tmp_path / "out"
    with pytest.raises(RankFailed, match=r"rank 1 of 2 failed: injected failure on rank 1 \(RuntimeError\)"):
        grow_parallel(checkpoint_dir("gpt2"), target_for("gpt2"), out, nproc=2, fit_steps=1, batch_size=4,
                      seq_len=32, device="cpu")
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out.partial")]


def test_an_input_error_keeps_its_kind_across_processes(checkpoint_dir, tmp_path):
    with pytest.raises(DataError, match=r"rank \d of 2 failed: data path .* does not exist"):
        grow_parallel(checkpoint_dir("gpt2"), target_for("gpt2"), tmp_path / "out", nproc=2, fit_steps=1,
                      batch_size=4, seq_len=32, device="cpu", data=str(tmp_path / "missing.txt"))
    assert not (tmp_path / "out").exists()


def test_cpu_ranks_on_one_machine_share_its_memory_budget(checkpoint_dir, tmp_path):
    """Each rank's plan (about 0.6 GiB here, mostly the runtime) fits 1 GiB, not the half each of two
    CPU processes on one machine gets."""
    with pytest.raises(MemoryPlanError, match=r"budget of 0\.5 GiB \(given, shared by 2 processes\)"):
        grow_parallel(checkpoint_dir("gpt2"), target_for("gpt2"), tmp_path / "out", nproc=2, fit_steps=1,
                      batch_size=4, seq_len=32, device="cpu", memory_gb=1.0)
    assert not (tmp_path / "out").exists()


def test_nothing_to_fit_runs_in_one_process(checkpoint_dir, tmp_path):
    report = grow_parallel(checkpoint_dir("gpt2"), target_for("gpt2"), tmp_path / "out", nproc=2, strategy="stack",
                           device="cpu")
    assert report["processes"] == 1 and (tmp_path / "out" / "model.safetensors").is_file()
