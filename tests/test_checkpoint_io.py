"""Inputs and outputs of the growth job: archives, formats, bad checkpoints, HF-loadable results, CLI."""

import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import ligo_core
from ligo_core.cli import main as cli_main
from ligo_core.errors import CheckpointError, LigoError, TargetError
from tests.engine_fixtures import target_for

FAST = dict(fit_steps=3, batch_size=4, seq_len=32)


def _tar(src: Path, dest: Path, top: str = "model") -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(src, arcname=top)
    return dest


def _copy(src: Path, tmp_path: Path, name="copy") -> Path:
    d = tmp_path / name
    shutil.copytree(src, d)
    return d


@pytest.mark.parametrize("name", ["gpt2", "bert", "roberta", "llama", "llama-tied", "mistral", "qwen2"])
@pytest.mark.parametrize("strategy", ["ligo", "stack", "interpolate", "net2net", "preserve"])
def test_every_strategy_output_loads_and_runs(name, strategy, checkpoint_dir, tmp_path):
    out = tmp_path / "grown"
    exact = {"spread": 0.0} if strategy == "preserve" else {}  # the function kept exactly, end to end
    report = ligo_core.grow(checkpoint_dir(name), target_for(name), out, strategy=strategy, **FAST, **exact)
    assert {"config.json", "model.safetensors", "growth_report.json", "tokenizer.json"} <= set(report["files"])
    saved = json.loads((out / "growth_report.json").read_text())
    assert saved["strategy"] == strategy and saved["target"]["sizes"]["layers"] == 4
    assert saved["source"]["parameters"] < saved["target"]["parameters"]
    for key in ("small", "grown_before_fit", "grown_after_fit", "random_large"):
        assert isinstance(saved["heldout_loss"][key], float)
    assert saved["fit"]["steps"] == (3 if strategy == "ligo" else 0)
    assert saved["fit"]["flops"] > 0 and set(saved["versions"]) >= {"torch", "transformers", "ligo"}
    auto = transformers.AutoModelForMaskedLM if name in ("bert", "roberta") else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(out).eval()
    x = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=x).logits).all()
    if auto is transformers.AutoModelForCausalLM:
        generated = model.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert generated.shape == (1, 12)
    if strategy == "preserve" and name not in ("bert", "roberta"):
        assert saved["function_gap_max_logit"] < 1e-4


@pytest.mark.parametrize("name", ["gpt2-bare", "bert-bare"])
def test_bare_models_grow_with_fixed_strategies_and_ligo_is_refused(name, checkpoint_dir, tmp_path):
    """A bare model has no language-model loss: 'ligo' (fitted on that loss) is refused with what to
    use instead, and a fixed strategy grows it with no held-out LM losses in the report (issue 17)."""
    with pytest.raises(TargetError, match="no LM head.*Use a fixed strategy: 'preserve'"):
        ligo_core.grow(checkpoint_dir(name), target_for(name), tmp_path / "refused", strategy="ligo", **FAST)
    assert not (tmp_path / "refused").exists()
    report = ligo_core.grow(checkpoint_dir(name), target_for(name), tmp_path / "o", strategy="stack", **FAST)
    model = transformers.AutoModel.from_pretrained(tmp_path / "o")
    assert type(model).__name__ in ("GPT2Model", "BertModel")
    assert report["target"]["sizes"]["layers"] == 4
    losses = report["heldout_loss"]
    assert losses["note"] == "a bare model (no LM head) has no language-model loss"
    assert all(losses.get(k) is None for k in ("small", "grown_before_fit", "grown_after_fit", "random_large"))
    x = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        assert model(input_ids=x).last_hidden_state.shape == (1, 8, 48)


def test_sharded_output_round_trips(checkpoint_dir, tmp_path):
    out = tmp_path / "sharded"
    ligo_core.grow(checkpoint_dir("llama"), target_for("llama"), out, strategy="preserve", max_shard_size="40KB", **FAST)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    merged = {}
    for s in shards:
        merged.update(load_file(out / s))
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    for key, value in model.state_dict().items():
        assert torch.equal(merged[key], value), key
    # A sharded checkpoint is itself a valid source.
    assert ligo_core.inspect_checkpoint(out)["num_parameters"] == sum(p.numel() for p in model.parameters())


def test_archives_are_accepted(checkpoint_dir, tmp_path):
    src = checkpoint_dir("gpt2")
    tgz = _tar(src, tmp_path / "m.tar.gz")
    with zipfile.ZipFile(tmp_path / "m.zip", "w") as zf:
        for f in src.iterdir():
            zf.write(f, f.name)
    for archive in (tgz, tmp_path / "m.zip"):
        info = ligo_core.inspect_checkpoint(archive)
        assert info["family"] == "gpt2" and info["has_tokenizer"] and info["format"] == "safetensors"


def test_pytorch_bin_goes_through_weights_only(checkpoint_dir, tmp_path):
    d = _copy(checkpoint_dir("gpt2"), tmp_path)
    state = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")
    assert ligo_core.inspect_checkpoint(d)["format"] == "pytorch_bin"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights-only"):
        ligo_core.inspect_checkpoint(d)


def _tar_with(dest: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(dest, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return dest


def test_bad_inputs_are_refused_with_a_reason(checkpoint_dir, tmp_path):
    src = checkpoint_dir("gpt2")
    cases = {}

    escape = tarfile.TarInfo("../evil.txt")
    escape.size = 3
    cases["points outside"] = _tar_with(tmp_path / "escape.tar", [(escape, b"bad")])
    link = tarfile.TarInfo("model/config.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    cases["is a link"] = _tar_with(tmp_path / "link.tar", [(link, None)])
    (tmp_path / "garbage.tar.gz").write_bytes(b"not an archive at all")
    cases["not a readable tar"] = tmp_path / "garbage.tar.gz"
    (tmp_path / "weights.h5").write_bytes(b"x")
    cases["unsupported checkpoint file"] = tmp_path / "weights.h5"

    truncated = _copy(src, tmp_path, "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["corrupt or truncated"] = truncated

    nan = _copy(src, tmp_path, "nan")
    state = load_file(nan / "model.safetensors")
    next(v for k, v in state.items() if "c_fc.weight" in k)[0, 0] = float("nan")
    save_file(state, nan / "model.safetensors", metadata={"format": "pt"})
    cases["NaN"] = nan

    mismatch = _copy(src, tmp_path, "mismatch")
    cfg = json.loads((mismatch / "config.json").read_text())
    cfg["n_embd"] = 48
    (mismatch / "config.json").write_text(json.dumps(cfg))
    cases["has shape"] = mismatch

    fewer = _copy(src, tmp_path, "layers")
    cfg = json.loads((fewer / "config.json").read_text())
    cfg["n_layer"] = 3
    (fewer / "config.json").write_text(json.dumps(cfg))
    cases["is missing"] = fewer

    foreign = _copy(src, tmp_path, "foreign")
    cfg = json.loads((foreign / "config.json").read_text())
    cfg["model_type"] = "t5"
    (foreign / "config.json").write_text(json.dumps(cfg))
    cases["unsupported model_type 't5'"] = foreign

    noweights = _copy(src, tmp_path, "noweights")
    (noweights / "model.safetensors").unlink()
    cases["no weights found"] = noweights

    for message, path in cases.items():
        with pytest.raises(CheckpointError, match=message):
            ligo_core.inspect_checkpoint(path)
    assert not (tmp_path.parent / "evil.txt").exists()


def test_named_files_stay_inside_the_checkpoint(checkpoint_dir, tmp_path):
    """Shard index entries and tokenizer files may not leave the checkpoint; links out of it are
    refused for archives and uploads, and followed only for a user's own directory."""
    from safetensors.torch import load_file as load

    src = checkpoint_dir("gpt2")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(src / "model.safetensors", outside / "model.safetensors")
    state = load(str(src / "model.safetensors"))

    def indexed(entry: str) -> Path:
        d = _copy(src, tmp_path, f"idx-{len(list(tmp_path.iterdir()))}")
        (d / "model.safetensors").rename(d / "shard.safetensors")
        index = {"metadata": {}, "weight_map": {k: entry for k in state}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        return d

    for entry in (str(outside / "model.safetensors"), "../elsewhere/model.safetensors", "/etc/passwd"):
        with pytest.raises(CheckpointError, match="model.safetensors.index.json names .* outside the checkpoint"):
            ligo_core.inspect_checkpoint(indexed(entry))
    assert ligo_core.inspect_checkpoint(indexed("shard.safetensors"))["num_parameters"] > 0
    # A link out of the directory: refused by default (archives, the service), followed on request
    # (the CLI, for a Hugging Face cache snapshot).
    linked = indexed("shard.safetensors")
    (linked / "shard.safetensors").unlink()
    (linked / "shard.safetensors").symlink_to(outside / "model.safetensors")
    with pytest.raises(CheckpointError, match="resolves outside the checkpoint"):
        ligo_core.inspect_checkpoint(linked)
    assert ligo_core.inspect_checkpoint(linked, follow_links=True)["num_parameters"] > 0
    tok = _copy(src, tmp_path, "tok")
    config = json.loads((tok / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps({**config, "vocab_file": "/etc/passwd"}))
    with pytest.raises(CheckpointError, match="tokenizer_config.json's vocab_file names '/etc/passwd'"):
        ligo_core.inspect_checkpoint(tok)


def test_config_claims_are_checked_against_the_headers_before_allocating(checkpoint_dir, tmp_path):
    """Issue 16, finding 3: a config whose sizes the weights do not back is refused from the headers
    alone, fast, and without the memory its claims would take (measured in a fresh process)."""
    import subprocess
    import sys
    import time

    src = checkpoint_dir("gpt2")
    qwen = checkpoint_dir("qwen2")  # its config builds a list with an entry per layer: checked before that
    d = _copy(qwen, tmp_path, "claim-qwen")
    (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                               "num_hidden_layers": 10**12}))
    with pytest.raises(CheckpointError, match="num_hidden_layers=1000000000000 is above the limit"):
        ligo_core.inspect_checkpoint(d)
    cases = {"vocab_size": (16_000_000, "above the limit"), "n_positions": (500_000, "config implies"),
             "n_layer": (1000, "missing"), "n_head": (0, "positive whole number")}
    for key, (value, match) in cases.items():
        d = _copy(src, tmp_path, f"claim-{key}")
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, key: value}))
        started = time.perf_counter()
        with pytest.raises(CheckpointError, match=match):
            ligo_core.inspect_checkpoint(d)
        assert time.perf_counter() - started < 10, key  # building the model took 39 s; the timing goal is in bench/
    d = _copy(src, tmp_path, "claim-memory")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "vocab_size": 4_000_000}))  # within bounds: 0.5 GB claimed
    probe = (
        "import resource, ligo_core, ligo_core.checkpoint as c\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"try:\n    c.inspect_checkpoint({str(d)!r})\nexcept ligo_core.CheckpointError as e:\n    print(e)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split("\n")
    assert "config implies (4000000, 32)" in out[0]
    assert int(out[1]) < 64 * 1024, f"inspect grew the process by {int(out[1]) // 1024} MiB"


def test_inspect_reads_headers_and_scans_tensors_in_slices(checkpoint_dir, tmp_path):
    """Parameter count and dtype come from headers; NaN anywhere in a tensor is found by the
    sliced scan; a .bin with the same tensors gives the same answer."""
    from ligo_core.weights import open_weights

    src = checkpoint_dir("llama")
    info = ligo_core.inspect_checkpoint(src)
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    assert info["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert info["dtype"] == "float32" and info["format"] == "safetensors"
    with open_weights(src) as weights:
        name = "model.embed_tokens.weight"
        pieces = list(weights.chunks(name, max_elements=1000))
        assert len(pieces) > 1 and torch.equal(torch.cat(pieces), model.get_input_embeddings().weight)
    state = load_file(str(src / "model.safetensors"))
    state["model.layers.1.mlp.down_proj.weight"][-1, -1] = float("nan")  # the last element of a late tensor
    bad = _copy(src, tmp_path, "nan")
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="down_proj.weight' holds NaN"):
        ligo_core.inspect_checkpoint(bad)
    as_bin = _copy(src, tmp_path, "bin")
    (as_bin / "model.safetensors").unlink()
    torch.save(load_file(str(src / "model.safetensors")), as_bin / "pytorch_model.bin")
    assert ligo_core.inspect_checkpoint(as_bin)["num_parameters"] == info["num_parameters"]


def test_targets_that_shrink_or_do_not_fit_are_refused(checkpoint_dir, tmp_path):
    src = checkpoint_dir("gpt2")
    for target, message in [
        ("layers=1", "n_layer: target 1 is smaller"),
        ("hidden=50,heads=4", "n_embd=50 is not divisible by n_head=4"),
        ("hidden=64,heads=4,kv_heads=2", "kv_heads"),
        ("bert-base", "does not match the source"),
        ("layers=two", "whole number"),
        ("nonsense", "unknown target"),
    ]:
        with pytest.raises(TargetError, match=message):
            ligo_core.grow(src, target, tmp_path / "never", strategy="preserve")
    assert not (tmp_path / "never").exists()
    cfg = json.loads((src / "config.json").read_text())
    cfg["vocab_size"] = 999
    (tmp_path / "other.json").write_text(json.dumps(cfg))
    with pytest.raises(TargetError, match="vocab_size"):
        ligo_core.grow(src, str(tmp_path / "other.json"), tmp_path / "never", strategy="preserve")


def test_cancellation_leaves_nothing_behind(checkpoint_dir, tmp_path):
    calls = []

    def cancel_after_two():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(ligo_core.GrowthCancelled):
        ligo_core.grow(checkpoint_dir("gpt2"), target_for("gpt2"), tmp_path / "out", strategy="ligo",
                       should_cancel=cancel_after_two, fit_steps=50, batch_size=4, seq_len=32)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_fitting_data_from_jsonl_and_errors(checkpoint_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"The {i}th sentence of a small corpus about growing models."})
                              for i in range(400)))
    report = ligo_core.grow(checkpoint_dir("gpt2"), target_for("gpt2"), tmp_path / "o", data=data, **FAST)
    assert report["fit"]["data"] == str(data)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "no text field"}\n')
    with pytest.raises(LigoError, match="no string field 'text'"):
        ligo_core.grow(checkpoint_dir("gpt2"), target_for("gpt2"), tmp_path / "o2", data=bad, **FAST)


def test_cli_grow_inspect_and_errors(checkpoint_dir, tmp_path, capsys):
    src = str(_tar(checkpoint_dir("llama"), tmp_path / "llama.tar.gz"))
    out = tmp_path / "cli-out"
    code = cli_main(["grow", src, "--target", "layers=4,hidden=64,heads=8,kv_heads=4,ffn=128", "--out", str(out),
                     "--fit-steps", "2", "--batch-size", "4", "--seq-len", "32", "--accumulate", "2", "--noise", "0.5", "--json"])
    assert code == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    # Before any work, stderr says what the target resolved to.
    assert "target: layers 4, hidden 64, heads 8, kv_heads 4, ffn 128, head_dim 8, parameters" in captured.err
    assert report["noise"] == 0.5
    assert report["fit"]["accumulate"] == 2 and report["fit"]["tokens"] == 2 * 2 * 4 * 32
    assert report["target"]["sizes"] == {"layers": 4, "hidden": 64, "heads": 8, "kv_heads": 4, "ffn": 128, "head_dim": 8}
    assert cli_main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_parameters"] == report["target"]["parameters"]
    assert cli_main(["grow", src, "--target", "layers=1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # The stage it reached (a log line with its time), then one line naming the problem.
    assert err[0].endswith("loading the checkpoint and the fitting text") and len(err) == 2
    assert err[1].startswith("ligo: error:") and "num_hidden_layers" in err[1]
    assert cli_main(["grow", src, "--target", "layers=4", "--out", str(out)]) == 2  # output exists
    assert "not an empty directory" in capsys.readouterr().err
    assert cli_main(["grow", src, "--target", "layers=4", "--out", str(tmp_path / "y"), "--accumulate", "0"]) == 2
    assert "--accumulate must be positive" in capsys.readouterr().err
    assert cli_main(["grow", src, "--target", "layers=4", "--out", str(tmp_path / "z"), "--noise", "2"]) == 2
    assert "noise (symmetry breaking between copied units) must be in [0, 1], got 2.0" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()
