"""Streamed output (ligo_core/stream.py): the same tensors as the in-memory path, written one at a time;
held-out scoring sized by eval_tokens; the memory plan (ligo_core/memory_plan.py)."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

from ligo_core import memory_plan
from ligo_core.checkpoint import load_checkpoint
from ligo_core.cli import main as cli_main
from ligo_core.data import batches, build_token_data
from ligo_core.errors import CheckpointError, MemoryPlanError
from ligo_core.growth import grow_model
from ligo_core.output import write_checkpoint
from ligo_core.pipeline import grow
from ligo_core.targets import resolve_target
from tests.engine_fixtures import make_model

FIXED = ["preserve", "stack", "interpolate", "net2net"]
TARGETS = {"gpt2": "layers=4,hidden=64,heads=8,ffn=256", "llama": "layers=5,hidden=48,heads=6,kv_heads=3,ffn=96",
           "llama-tied": "layers=4,hidden=64,heads=8,kv_heads=4,ffn=128"}


def _saved(tmp_path: Path, name: str, dtype=torch.bfloat16, tokenizer=None) -> Path:
    d = tmp_path / f"src-{name}"
    make_model(name).to(dtype).save_pretrained(d)
    if tokenizer is not None:
        tokenizer.save_pretrained(d)
    return d


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_same_checkpoint(streamed: Path, reference: Path) -> None:
    a, b = _tensors(streamed), _tensors(reference)
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    for name in ("config.json", "generation_config.json"):
        assert (streamed / name).is_file() == (reference / name).is_file()
        if (reference / name).is_file():
            assert json.loads((streamed / name).read_text()) == json.loads((reference / name).read_text())


def _in_memory(src: Path, target: str, out: Path, dtype=torch.bfloat16, **kwargs) -> None:
    """The path kept for scoring: the whole grown model in memory (its tensors made in ``dtype``, as
    the streamed grow makes them), then saved in ``dtype``."""
    loaded = load_checkpoint(src)
    large, _ = grow_model(loaded.model, resolve_target(target, loaded.config), dtype=dtype, **kwargs)
    write_checkpoint(large, out, dtype=dtype, source_dir=src, report={}, max_shard_size="40KB")


@pytest.mark.parametrize("name", list(TARGETS))
@pytest.mark.parametrize("strategy", FIXED)
def test_streamed_fixed_strategies_equal_the_in_memory_path(tmp_path, name, strategy):
    """bf16 in, bf16 out, sharded: tensor for tensor (tied embeddings, GQA, GPT-2's fused Conv1D)."""
    src = _saved(tmp_path, name)
    report = grow(src, TARGETS[name], tmp_path / "streamed", strategy=strategy, max_shard_size="40KB")
    _in_memory(src, TARGETS[name], tmp_path / "reference", strategy=strategy, fit_steps=0)
    _assert_same_checkpoint(tmp_path / "streamed", tmp_path / "reference")
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(_tensors(tmp_path / "streamed"))
    assert report["eval_tokens"] == 0 and report["target"]["parameters"] == sum(
        t.numel() for t in _tensors(tmp_path / "streamed").values())


@pytest.mark.parametrize("name", list(TARGETS))
def test_a_bf16_grow_is_the_fp32_grow_rounded_but_for_its_moves(tmp_path, name):
    """Made in bf16 (ligo_core/rowblocks.py), a grow without moves is the fp32 grow rounded once, bit
    for bit. Moves are added in bf16 arithmetic from a rounded step and direction, so a moved entry
    may round the other way: by no more than the bf16 rounding of the tensor's largest entries."""
    loaded = load_checkpoint(_saved(tmp_path, name))
    target = resolve_target(TARGETS[name], loaded.config)
    for strategy, exact in (("preserve", True), ("stack", False)):  # spread 0 and 2 by default
        in_bf16, _ = grow_model(loaded.model, target, strategy=strategy, fit_steps=0, dtype=torch.bfloat16)
        in_fp32, _ = grow_model(loaded.model, target, strategy=strategy, fit_steps=0)
        made, reference = in_bf16.state_dict(), in_fp32.state_dict()
        off = 0
        for key, value in reference.items():
            rounded, got = value.to(torch.bfloat16).float(), made[key]
            assert (got - rounded).abs().max() <= 2**-6 * rounded.abs().max(), (strategy, key)
            off += int((got != rounded).sum())
        assert (off == 0) == exact, strategy


def test_streamed_grow_written_direct_equals_the_in_memory_path(tmp_path, monkeypatch):
    """Tensors from 4 KB up written with O_DIRECT (ligo_core/direct_io.py), their memory aligned as
    their file offsets (ShardWriter.buffer): the same checkpoint, and the headers still load."""
    from ligo_core import direct_io

    monkeypatch.setattr(direct_io, "DIRECT_MIN", 4096)
    src = _saved(tmp_path, "llama")
    grow(src, TARGETS["llama"], tmp_path / "streamed", strategy="stack", max_shard_size="40KB")
    _in_memory(src, TARGETS["llama"], tmp_path / "reference", strategy="stack", fit_steps=0)
    _assert_same_checkpoint(tmp_path / "streamed", tmp_path / "reference")
    for shard in (tmp_path / "streamed").glob("*.safetensors"):
        header = int.from_bytes(shard.read_bytes()[:8], "little")
        assert (8 + header) % direct_io.ALIGN == 0  # the data starts on a block boundary


def test_dtype_option_writes_float32_from_a_bf16_source(tmp_path):
    src = _saved(tmp_path, "llama-tied")
    grow(src, TARGETS["llama-tied"], tmp_path / "streamed", strategy="stack", dtype="float32")
    _in_memory(src, TARGETS["llama-tied"], tmp_path / "reference", dtype=torch.float32, strategy="stack",
               fit_steps=0)
    _assert_same_checkpoint(tmp_path / "streamed", tmp_path / "reference")
    assert json.loads((tmp_path / "streamed" / "config.json").read_text())["dtype"] == "float32"


@pytest.mark.parametrize("name", ["gpt2", "llama-tied"])
def test_fitted_ligo_is_written_streamed_equal_to_the_in_memory_path(tmp_path, tokenizer, name):
    """eval_tokens=0: no scoring, so the fitted operator's model is written tensor by tensor."""
    src = _saved(tmp_path, name, dtype=torch.float32, tokenizer=tokenizer)
    options = dict(strategy="ligo", fit_steps=2, seed=3)
    report = grow(src, TARGETS[name], tmp_path / "streamed", batch_size=2, seq_len=16, eval_tokens=0, **options)
    assert report["fit"]["steps"] == 2 and report["eval_tokens"] == 0
    assert report["heldout_loss"]["grown_after_fit"] is None
    loaded = load_checkpoint(src)
    data = build_token_data(None, loaded.tokenizer, 16, max_train_tokens=2 * 2 * 16 * 2, max_heldout_tokens=64 * 16)
    large, _ = grow_model(loaded.model, resolve_target(TARGETS[name], loaded.config), tokenizer=loaded.tokenizer,
                          train_batches=batches(data.train, 2, 3), **options)
    write_checkpoint(large, tmp_path / "reference", dtype=torch.float32, source_dir=src, report={})
    _assert_same_checkpoint(tmp_path / "streamed", tmp_path / "reference")


def test_streamed_preserve_keeps_the_function(tmp_path):
    src = _saved(tmp_path, "llama-tied", dtype=torch.float32)
    grow(src, TARGETS["llama-tied"], tmp_path / "out", strategy="preserve")
    small = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    large = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(0, small.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gap = (small(input_ids=x).logits - large(input_ids=x).logits).abs().max().item()
    assert gap < 1e-4


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_depth_only_stack_is_plain_layer_stacking(tmp_path, name):
    """Depth up-scaling as practised (layer l copies l mod L1, everything else copied): bit for bit."""
    src = _saved(tmp_path, name)
    grow(src, "layers=5", tmp_path / "out", strategy="stack", spread=0.0, noise=0.0)
    small, grown = _tensors(src), _tensors(tmp_path / "out")
    layers = small.keys() - {k for k in small if ".0." not in k and ".1." not in k}
    assert layers
    for key, tensor in grown.items():
        parts = key.split(".")
        at = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        source = key if at is None else ".".join(parts[:at] + [str(int(parts[at]) % 2)] + parts[at + 1:])
        assert tensor.dtype == small[source].dtype and torch.equal(tensor, small[source]), key
    assert sum(".4." in k for k in grown) == sum(".0." in k for k in small)


def test_failed_stream_leaves_nothing(tmp_path):
    src = _saved(tmp_path, "llama")
    state = load_file(src / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="NaN"):
        grow(src, TARGETS["llama"], tmp_path / "out", strategy="stack")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src-llama"]


def test_streamed_shards_have_planned_headers(tmp_path):
    src = _saved(tmp_path, "gpt2")
    grow(src, TARGETS["gpt2"], tmp_path / "out", strategy="stack", max_shard_size="30KB")
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shapes = {}
    for shard in set(index["weight_map"].values()):
        with safe_open(out / shard, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    assert shapes["transformer.h.3.attn.c_attn.weight"] == (64, 192)
    assert shapes["transformer.wte.weight"] == (384, 64)
    assert index["metadata"]["total_size"] == 2 * sum(torch.Size(s).numel() for s in shapes.values())


def test_eval_tokens_sizes_held_out_scoring(tmp_path, tokenizer):
    src = _saved(tmp_path, "gpt2", dtype=torch.float32, tokenizer=tokenizer)
    report = grow(src, TARGETS["gpt2"], tmp_path / "a", strategy="preserve", seq_len=16, eval_tokens=64)
    assert report["eval_tokens"] == 64 and report["heldout_loss"]["sequences"] == 4
    assert report["heldout_loss"]["small"] is not None and report["function_gap_max_logit"] < 1e-4
    report = grow(src, TARGETS["gpt2"], tmp_path / "b", strategy="preserve", seq_len=16, eval_tokens=0)
    assert report["eval_tokens"] == 0 and report["heldout_loss"]["small"] is None
    _assert_same_checkpoint(tmp_path / "b", tmp_path / "a")
    with pytest.raises(Exception, match="eval_tokens=8 is below"):
        grow(src, TARGETS["gpt2"], tmp_path / "c", strategy="preserve", seq_len=16, eval_tokens=8)


LLAMA_1B = {"model_type": "llama", "num_hidden_layers": 16, "hidden_size": 2048, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 8192, "vocab_size": 128256,
            "tie_word_embeddings": True, "dtype": "bfloat16"}
LLAMA_8B = {**LLAMA_1B, "num_hidden_layers": 32, "hidden_size": 4096, "head_dim": 128, "intermediate_size": 14336}


def test_memory_plan_formula():
    small, large = memory_plan.shape_of(LLAMA_1B), memory_plan.shape_of(LLAMA_8B)
    assert small.parameters() == pytest.approx(1_235_814_400, rel=1e-4)  # Llama 3.2 1B (norms approximate)
    assert large.largest_tensor() == 128256 * 4096
    apply = memory_plan.plan(LLAMA_1B, LLAMA_8B, strategy="stack")
    # runtime + one bf16 source tensor + the read cache + three bf16 output buffers (made by blocks)
    assert apply["bytes"] == (memory_plan.RUNTIME_BYTES + 2 * 128256 * 2048 + memory_plan.READ_CACHE_BYTES
                              + 3 * 2 * 128256 * 4096)
    assert apply["biggest"] == "output tensor" and 4.5 < apply["gib"] < 5.5
    # writing a fitted operator's model makes each tensor whole in fp32 first
    written = memory_plan.plan(LLAMA_1B, LLAMA_8B, strategy="ligo")
    assert written["bytes"] - apply["bytes"] == 4 * 128256 * 4096
    scored = memory_plan.plan(LLAMA_1B, LLAMA_8B, strategy="stack", scored=True)
    assert scored["biggest"] == "grown model" and scored["gib"] > 30
    fit = memory_plan.plan(LLAMA_1B, LLAMA_8B, strategy="ligo", fit_steps=10, batch_size=8, seq_len=512)
    assert {"small model", "operator", "large layer", "activations"} <= set(fit["terms"])
    # LiGO's operator for 1B -> 8B: 3.5B entries, 16 bytes each while fitting in one process (over 80 GB)
    whole, per_layer = memory_plan.operator_parts(small, large)
    assert whole + 32 * per_layer == memory_plan.operator_parameters(small, large) == pytest.approx(3.53e9, rel=1e-2)
    assert fit["terms"]["operator"] == 16 * (whole + 32 * per_layer)
    # Two processes (FSDP, ligo_core/sharding.py): each holds half the per-layer expanders' values,
    # gradients and moments, one gathered layer, and half the batch's activations.
    two = memory_plan.plan(LLAMA_1B, LLAMA_8B, strategy="ligo", fit_steps=10, batch_size=8, seq_len=512, processes=2)
    assert two["terms"]["operator"] == 16 * (whole + 16 * per_layer) + 8 * per_layer
    assert two["terms"]["activations"] < fit["terms"]["activations"] / 1.9
    assert fit["gib"] > 80 > two["gib"]
    # Eight: the values gathered back whole after the fit (4 bytes an entry) are the larger part.
    eight = memory_plan.plan(LLAMA_1B, LLAMA_8B, strategy="ligo", fit_steps=10, batch_size=8, seq_len=512, processes=8)
    assert eight["terms"]["operator"] == 4 * (whole + 32 * per_layer)
    assert memory_plan.refusal(apply, 6 * memory_plan.GiB, "test") is None
    message = memory_plan.refusal(scored, 6 * memory_plan.GiB, "LIGO_WORKER_MEMORY_GB")
    assert "6.0 GiB" in message and "grown model" in message and f"{scored['bytes'] / 2**30:.1f} GiB" in message


def test_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("LIGO_WORKER_MEMORY_GB", "3.5")
    assert memory_plan.budget_bytes() == (int(3.5 * 2**30), "LIGO_WORKER_MEMORY_GB")
    assert memory_plan.budget_bytes(2)[0] == 2 * 2**30
    monkeypatch.delenv("LIGO_WORKER_MEMORY_GB")
    assert memory_plan.budget_bytes()[0] > 0


def test_cli_refuses_a_job_above_the_budget(tmp_path, capsys):
    src = _saved(tmp_path, "gpt2")
    code = cli_main(["grow", str(src), "--target", "layers=4", "--out", str(tmp_path / "out"),
                     "--strategy", "stack", "--memory-gb", "0.1"])
    err = capsys.readouterr().err
    assert code == 2 and "above the worker's budget of 0.1 GiB" in err and "runtime" not in err.split("biggest")[0]
    assert not (tmp_path / "out").exists()
    with pytest.raises(MemoryPlanError):
        grow(src, "layers=4", tmp_path / "out", strategy="stack", memory_gb=0.1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA GPU")
def test_a_device_this_machine_lacks_is_named_before_any_work(tmp_path, capsys):
    from ligo_core.errors import DeviceError
    from ligo_core.parallel import grow_parallel
    from ligo_core.training import default_device

    src = _saved(tmp_path, "gpt2")
    code = cli_main(["grow", str(src), "--target", "layers=4", "--out", str(tmp_path / "out"), "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and "device 'cuda': torch" in err and "sees no CUDA GPU" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    for device, problem in (("cuda:3", "sees no CUDA GPU"), ("tpu", "not one of auto, cpu, cuda"),
                            ("mps", "only cpu and cuda")):
        with pytest.raises(DeviceError, match=problem):
            default_device(device)
    assert default_device("cpu") == torch.device("cpu") and default_device(None) == torch.device("cpu")
    with pytest.raises(DeviceError, match="sees no CUDA GPU"):  # before any rank is started
        grow_parallel(src, "layers=4", tmp_path / "out", nproc=2, fit_steps=1, device="cuda")
    assert not (tmp_path / "out").exists()


def test_moves_drawn_in_pieces_are_the_same_numbers(tmp_path, monkeypatch):
    """Copies are moved apart a few rows at a time (bounded memory at 8B): the pieces add what one
    piece would, first copies with several pairs included."""
    import ligo_core.separation as separation

    src = _saved(tmp_path, "llama-tied")
    _in_memory(src, TARGETS["llama-tied"], tmp_path / "reference", strategy="stack", fit_steps=0)
    monkeypatch.setattr(separation, "MOVE_CHUNK", 64)
    grow(src, TARGETS["llama-tied"], tmp_path / "streamed", strategy="stack")
    _assert_same_checkpoint(tmp_path / "streamed", tmp_path / "reference")


@pytest.mark.parametrize("name", ["gpt2", "llama-tied"])
@pytest.mark.parametrize("block", [64, 2**22])
def test_tensors_made_by_blocks_equal_whole_tensors_moved_whole(name, block, monkeypatch):
    """rowblocks makes each tensor a block of rows at a time and moves it as it goes (first copies'
    norms from their own rows, columns' norms in a first pass); the same operator applied to whole
    tensors, then moved whole with the same draws (``Separation.move``), gives the same model."""
    import ligo_core.rowblocks as rowblocks
    from ligo_core.growth import plan_layout, start_operator
    from ligo_core.separation import Separation

    monkeypatch.setattr(rowblocks, "BLOCK", block)  # 64: blocks of a row or two, cutting every run
    small = make_model(name)
    state = {k: v.float() for k, v in small.state_dict().items()}
    layout = plan_layout(small.config, {k: tuple(v.shape) for k, v in state.items()})
    operator, _ = start_operator(small.config, layout, resolve_target(TARGETS[name], small.config), strategy="stack",
                                 planned=True)
    blocks = Separation(operator, operator.spread, torch.Generator().manual_seed(2))
    whole = Separation(operator, operator.spread, torch.Generator().manual_seed(2))
    moved = 0
    for spec, layer, full_name, tensor in rowblocks.fixed_tensors(operator, state.__getitem__, layout.names, blocks,
                                                                  torch.float32):
        reference = operator.fixed_tensor(spec, state, layout.names[spec.name], layer)
        unmoved = reference.clone()
        whole.move(reference, spec, layer)
        moved += not torch.equal(reference, unmoved)
        torch.testing.assert_close(tensor, reference, rtol=1e-5, atol=1e-6, msg=full_name)
    assert moved >= 3  # the embedding (columns) and the blocks' output and FFN matrices (rows)


def test_read_cache_reads_each_tensor_once_within_its_budget_and_refuses_nan():
    from ligo_core.weights import ReadCache

    store = {"a": torch.ones(4, 4), "b": torch.ones(4, 4), "bad": torch.tensor([1.0, float("nan")]),
             "huge": torch.full((2,), 3e38)}
    reads = []

    def read(name):
        reads.append(name)
        return store[name].clone()

    cache = ReadCache(read, budget=64 + 8)  # one 4x4 fp32 tensor and a bit
    cache("a"), cache("a")
    assert reads == ["a"]
    cache("b"), cache("a")  # "b" pushed "a" out
    assert reads == ["a", "b", "a"]
    assert torch.equal(cache("huge"), store["huge"])  # its sum overflows: checked entry by entry, and finite
    with pytest.raises(CheckpointError, match="'bad' holds NaN"):
        cache("bad")


def test_writer_hands_back_written_buffers(tmp_path):
    """A buffer is refilled once the writing thread has written it, instead of a new allocation."""
    from ligo_core.stream import ShardWriter

    shapes = {f"t{i}": (64, 32) for i in range(4)}
    writer = ShardWriter(tmp_path, shapes, torch.bfloat16, "1GB")
    addresses = set()
    for i, name in enumerate(shapes):
        buffer = writer.buffer(name, shapes[name])
        addresses.add(buffer.untyped_storage().data_ptr())
        buffer.fill_(i)
        writer.write(name, buffer)
        writer.close()  # wait for the write, so the buffer is back before the next one is asked for
    writer.finish()
    assert len(addresses) == 1
    written = _tensors(tmp_path)
    assert all(torch.equal(written[f"t{i}"], torch.full((64, 32), float(i), dtype=torch.bfloat16)) for i in range(4))
