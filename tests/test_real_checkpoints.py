"""Real pretrained checkpoints that registry packages ship (bench/real_checkpoints.py).

`preserve` keeps a real model's logits and greedy generation, through the CLI and the service's
call; the fit's guard holds on a real model; a bare encoder is refused by `ligo` and gets no
meaningless LM loss. The real models are cut to their first two layers to keep this fast: the
weights are real, the function is not the whole model's. Skipped (failed under
LIGO_TEST_REQUIRE_SERVICES=1) when the packages are not installed; see docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ligo_core
from bench import real_checkpoints
from ligo_core.cli import main as cli
from ligo_core.data import default_corpus_texts
from tests.service_fixtures import missing

SENTENCES = ["The capital of France is Paris, and the capital of Italy is", "def add(a, b):\n    return"]
WIDER_DEEPER = "layers=4,hidden=768,heads=12,kv_heads=4,ffn=2048"  # the width, GQA 12/4


def _real(name: str):
    reason = real_checkpoints.missing_reason(name)
    if reason:
        missing(f"real checkpoint {name} ({reason})")
    return real_checkpoints.export(name)


@pytest.fixture(scope="module")
def smollm2_two_layers(tmp_path_factory):
    """SmolLM2-135M's embeddings, first two layers, final norm and tied head, saved as a checkpoint."""
    directory = _real("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    del model.model.layers[2:]
    model.config.num_hidden_layers = 2
    out = tmp_path_factory.mktemp("smollm2-2l")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(directory).save_pretrained(out)
    return out


def _logits_and_greedy(directory, ids):
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        greedy = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    return logits, greedy


def test_preserve_keeps_a_real_llamas_logits_and_greedy_generation_through_the_cli(smollm2_two_layers, tmp_path):
    out = tmp_path / "grown"
    assert cli(["grow", str(smollm2_two_layers), "--target", WIDER_DEEPER, "--strategy", "preserve",
                "--out", str(out), "--json"]) == 0
    report = json.loads((out / "growth_report.json").read_text())
    assert report["spread"] == 0 and report["fit"]["outcome"] is None  # preserve's default: exact
    assert report["function_gap_max_logit"] < 1e-4
    tokenizer = AutoTokenizer.from_pretrained(smollm2_two_layers)
    ids = tokenizer(SENTENCES[0], return_tensors="pt").input_ids
    small_logits, small_greedy = _logits_and_greedy(smollm2_two_layers, ids)
    grown_logits, grown_greedy = _logits_and_greedy(out, ids)
    assert (grown_logits - small_logits).abs().max() < 1e-4
    assert torch.equal(grown_greedy, small_greedy)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_preserve_with_the_cli_and_service_defaults_is_exact(name, checkpoint_dir, tmp_path):
    """The worker calls ligo_core.grow with the job's growth options, defaults left out; the CLI
    passes no spread unless given one."""
    from app.schemas import GrowthOptions

    target = "layers=4,hidden=64,heads=8,ffn=128"  # 2x depth and width
    report = ligo_core.grow(checkpoint_dir(name), target, tmp_path / "service", strategy="preserve", fit_steps=100,
                            **GrowthOptions().model_dump(exclude_none=True))
    assert report["spread"] == 0 and report["function_gap_max_logit"] < 1e-4
    assert cli(["grow", str(checkpoint_dir(name)), "--target", target, "--strategy", "preserve",
                "--out", str(tmp_path / "cli")]) == 0
    report = json.loads((tmp_path / "cli" / "growth_report.json").read_text())
    assert report["spread"] == 0 and report["function_gap_max_logit"] < 1e-4


def test_the_guard_writes_the_start_when_a_real_models_fit_diverges(smollm2_two_layers, tmp_path):
    data = tmp_path / "lines.txt"  # one paragraph per line, no blank lines
    data.write_text("\n".join(default_corpus_texts()[:200]) + "\n")
    report = ligo_core.grow(smollm2_two_layers, "layers=3", tmp_path / "out", strategy="ligo", fit_steps=6,
                            lr=1.0, data=data, batch_size=2, seq_len=64)
    fit, losses = report["fit"], report["heldout_loss"]
    assert fit["outcome"] == "stopped_diverged" and fit["stopped_at"] < 6, fit
    assert fit["best_step"] == 0 and losses["grown_after_fit"] == losses["fit_start"]
    assert losses["sequences"] >= 2


def test_a_real_bare_encoder_is_refused_by_ligo_and_shows_no_lm_loss(tmp_path, capsys):
    directory = _real("all-minilm-l6-v2")
    assert cli(["grow", str(directory), "--target", "layers=7", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "no LM head" in err and "'preserve'" in err
    report = ligo_core.grow(directory, "layers=7", tmp_path / "b", strategy="preserve")
    assert set(report["heldout_loss"]) >= {"note"}
    assert report["heldout_loss"]["small"] is None and report["heldout_loss"]["grown_after_fit"] is None


def test_export_is_idempotent(tmp_path):
    first = _real("all-minilm-l6-v2")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert real_checkpoints.export("all-minilm-l6-v2") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
