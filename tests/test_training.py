"""The plain training loop lowers loss; held-out evaluation is deterministic; the tokenizer."""

import ctypes
import ctypes.util
import math

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

from ligo_core.allocator import keep_freed_memory
from ligo_core.data import batches, default_corpus_texts, pack_tokens
from ligo_core.objective import heldout_loss, tokenizer_info
from ligo_core.tokenizer import train_tokenizer
from ligo_core.training import lr_at, train

VOCAB = 384
SEQ = 32


@pytest.fixture(scope="module")
def texts():
    return default_corpus_texts()[:400]


@pytest.fixture(scope="module")
def gpt_tok(texts):
    return train_tokenizer(texts, VOCAB, style="gpt2")


@pytest.fixture(scope="module")
def bert_tok(texts):
    return train_tokenizer(texts, VOCAB, style="bert")


def _gpt(tok):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=SEQ, n_layer=2, n_embd=32, n_head=4,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _bert(tok):
    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=len(tok), max_position_embeddings=SEQ, num_hidden_layers=2,
                                      hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                      pad_token_id=tok.pad_token_id))


def test_tokenizers_have_the_special_tokens_their_family_needs(gpt_tok, bert_tok):
    assert len(gpt_tok) <= VOCAB and len(bert_tok) <= VOCAB
    assert gpt_tok.eos_token == "<|endoftext|>" and gpt_tok.pad_token_id == gpt_tok.eos_token_id
    assert gpt_tok.mask_token_id is None
    ids = bert_tok("The river flows.")["input_ids"]
    assert ids[0] == bert_tok.cls_token_id and ids[-1] == bert_tok.sep_token_id
    assert bert_tok.decode(ids, skip_special_tokens=True) == "The river flows."
    assert gpt_tok.decode(gpt_tok("The river flows.")["input_ids"]) == "The river flows."
    info = tokenizer_info(bert_tok)
    assert info["mask_id"] == bert_tok.mask_token_id and info["mask_id"] not in info["special_ids"]
    assert {bert_tok.pad_token_id, bert_tok.cls_token_id, bert_tok.sep_token_id} <= set(info["special_ids"])
    assert info["vocab_size"] == len(bert_tok)


def test_tokenizer_saves_and_reloads(tmp_path, bert_tok):
    from transformers import AutoTokenizer

    bert_tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("A test.")["input_ids"] == bert_tok("A test.")["input_ids"]
    assert again.mask_token_id == bert_tok.mask_token_id


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    assert lr_at(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, warmup=10) == pytest.approx(0.1)  # cosine floor: 10% of peak
    assert lr_at(55, 100, 1.0, warmup=10) == pytest.approx(0.55)  # cosine midpoint: halfway to the floor
    assert lr_at(55, 100, 1.0, warmup=10, schedule="linear") == pytest.approx(0.55)
    assert lr_at(99, 100, 1.0, warmup=10, schedule="constant") == 1.0
    lrs = [lr_at(s, 100, 1.0, warmup=10) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_training_lowers_held_out_loss_for_a_causal_lm(gpt_tok, texts):
    tokens = pack_tokens(texts, gpt_tok, SEQ)
    train_tokens, heldout = tokens[:-16], tokens[-16:]
    model = _gpt(gpt_tok)
    before = heldout_loss(model, heldout, "clm")
    assert before == pytest.approx(math.log(len(gpt_tok)), abs=0.3)  # a fresh model is near uniform
    hist = train(model, batches(train_tokens, 8, seed=0), 60, lr=3e-3, warmup=5, objective="clm",
                 eval_every=20, eval_fn=lambda m: heldout_loss(m, heldout, "clm"))
    after = heldout_loss(model, heldout, "clm")
    assert after < before - 1.0
    assert [e["step"] for e in hist["evals"]] == [0, 20, 40, 60]
    assert hist["evals"][0]["loss"] == pytest.approx(before)
    assert hist["evals"][-1]["loss"] == pytest.approx(after)
    times = [e["train_time"] for e in hist["evals"]]
    assert times[0] == 0.0 and all(a < b for a, b in zip(times, times[1:]))
    assert len(hist["train_loss"]) == 60 and hist["train_time"] == pytest.approx(times[-1])
    assert model.training  # evaluation restores the training mode


def test_training_lowers_masked_lm_loss_and_eval_masks_are_fixed_by_seed(bert_tok, texts):
    tokens = pack_tokens(texts, bert_tok, SEQ)
    train_tokens, heldout = tokens[:-16], tokens[-16:]
    info = tokenizer_info(bert_tok)
    model = _bert(bert_tok)
    first = heldout_loss(model, heldout, "mlm", info, seed=7)
    assert heldout_loss(model, heldout, "mlm", info, seed=7) == first
    assert heldout_loss(model, heldout, "mlm", info, seed=8) != first
    train(model, batches(train_tokens, 8, seed=0), 60, lr=3e-3, warmup=5, objective="mlm", tokenizer_info=info)
    assert heldout_loss(model, heldout, "mlm", info, seed=7) < first - 0.7


def test_same_seed_same_training(gpt_tok, texts):
    tokens = pack_tokens(texts, gpt_tok, SEQ)
    losses = []
    for _ in range(2):
        model = _gpt(gpt_tok)
        losses.append(train(model, batches(tokens, 8, seed=3), 5, lr=1e-3, objective="clm")["train_loss"])
    assert losses[0] == losses[1]


def test_mlm_without_mask_token_is_refused(gpt_tok, texts):
    tokens = pack_tokens(texts[:50], gpt_tok, SEQ)
    with pytest.raises(ValueError, match="mask_id"):
        heldout_loss(_gpt(gpt_tok), tokens, "mlm", tokenizer_info(gpt_tok))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def test_large_tensors_reuse_freed_memory_instead_of_fresh_pages():
    """After keep_freed_memory, a 64 MiB tensor comes from malloc's heap (not its own mmap) and its
    memory stays there when freed, so the next step's tensors reuse pages already touched."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc 2.33+ to inspect malloc")
    libc.mallinfo2.restype = _MallInfo2
    assert keep_freed_memory()
    mmapped_before = libc.mallinfo2().hblks
    block = torch.ones(64 * 2**20, dtype=torch.uint8)
    assert libc.mallinfo2().hblks == mmapped_before
    del block
    assert libc.mallinfo2().fordblks >= 64 * 2**20  # freed, kept by malloc for reuse


def test_next_token_loss_matches_the_models_own():
    """The engine's causal loss (targets shifted, the last position ignored) is Hugging Face's."""
    from ligo_core.objective import loss_terms

    config = GPT2Config(vocab_size=97, n_positions=16, n_layer=1, n_embd=32, n_head=2)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()  # no dropout: both losses see the same function
    ids = torch.randint(0, 97, (3, 16))
    total, count = loss_terms(model, ids, "clm")
    assert count == 3 * 15
    torch.testing.assert_close(total / count, model(input_ids=ids, labels=ids).loss)


# The fit's guard (ligo_core/fit_guard.py) and the data reader (ligo_core/data.py).

@pytest.fixture(scope="module")
def fit_setup(tokenizer):
    from ligo_core.data import split_texts
    from tests.engine_fixtures import make_model
    from tests.test_growth import _pretrain

    train, held = split_texts(default_corpus_texts()[:1200])
    train, held = pack_tokens(train, tokenizer, 32), pack_tokens(held, tokenizer, 32)[:32]
    return _pretrain(make_model("llama"), train, steps=40), train, held


def _fit(small, train, held, tokenizer, **kw):
    from ligo_core.growth import grow_model
    from ligo_core.targets import resolve_target

    target = resolve_target("layers=4,hidden=48,heads=6,ffn=96", small.config)
    return grow_model(small, target, strategy="ligo", train_batches=batches(train, 8, 1), heldout=held,
                      tokenizer=tokenizer, **kw)


def test_an_absurd_learning_rate_stops_the_fit_and_writes_the_start(fit_setup, tokenizer):
    from ligo_core.objective import heldout_loss

    small, train, held = fit_setup
    large, info = _fit(small, train, held, tokenizer, fit_steps=20, lr=3.0)
    guard, losses = info["fit_guard"], info["heldout_loss"]
    assert guard["outcome"] == "stopped_diverged" and guard["stopped_at"] < 20, guard
    assert len(info["fit_history"]) == guard["stopped_at"]  # stopped early, not run to the end
    assert guard["best_step"] == 0 and "diverged" in guard["stop_reason"]
    # The model handed over is the start, loss for loss.
    assert losses["after_fit"] == losses["fit_start"]
    assert math.isclose(heldout_loss(large, held, "clm"), losses["fit_start"], rel_tol=1e-5)


def test_a_fit_that_helps_is_kept_and_never_ends_above_its_start(fit_setup, tokenizer):
    small, train, held = fit_setup
    _, info = _fit(small, train, held, tokenizer, fit_steps=8, lr=1e-3, ligo_init="stack", spread=0.0)
    guard, losses = info["fit_guard"], info["heldout_loss"]
    assert guard["outcome"] == "improved" and guard["best_step"] > 0, guard
    assert losses["after_fit"] < losses["fit_start"]
    assert [step for step, _ in guard["guard_checks"]] == list(range(9))  # the start, then every step
    assert info["fit_lr"] == 1e-3 and info["fit_warmup"] == 2


def test_a_best_state_that_fails_on_the_whole_heldout_set_falls_back_to_the_start(fit_setup, tokenizer, monkeypatch):
    """The slice picks the best state; the whole held-out set has the last word."""
    from ligo_core import fit_guard

    small, train, held = fit_setup
    scores = iter([5.0, 4.0, 4.5, 4.6, 4.7])  # step 1 looks best on the slice
    monkeypatch.setattr(fit_guard.FitGuard, "_check", lambda self, step, op: _fake_check(self, step, op, scores))
    monkeypatch.setattr(fit_guard, "DIVERGE_MARGIN", math.inf)  # lr 1.0 ruins the model without stopping the fit
    _, info = _fit(small, train, held, tokenizer, fit_steps=4, lr=1.0)
    guard, losses = info["fit_guard"], info["heldout_loss"]
    assert guard["outcome"] == "kept_start" and guard["best_step"] == 1, guard
    assert "start was written" in guard["final_check"]
    assert losses["after_fit"] == losses["fit_start"]


def _fake_check(guard, step, operator, scores):
    loss = next(scores)
    guard.checks.append((step, loss))
    if loss < guard.best_loss:
        guard.best_loss, guard.best_step = loss, step
        guard.best_state = {k: v.detach().clone() for k, v in operator.state_dict().items()}
    return loss


def test_default_recipe_warms_up_over_at_least_two_steps():
    from ligo_core.catalog import DEFAULT_FIT_LR
    from ligo_core.growth import fit_warmup

    assert DEFAULT_FIT_LR == 1e-4
    assert [fit_warmup(n) for n in (1, 4, 25, 100, 400)] == [1, 2, 2, 10, 40]
    assert lr_at(0, 4, 1e-4, fit_warmup(4)) == 0.5e-4  # the first step at half the rate


def test_one_paragraph_per_line_text_has_documents_and_a_heldout_set(tmp_path, gpt_tok):
    from ligo_core.data import build_token_data, load_texts

    paragraphs = default_corpus_texts()[:300]
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(paragraphs) + "\n")
    texts, _ = load_texts(path)
    assert texts == paragraphs  # one document per line when the file has no blank line
    data = build_token_data(path, gpt_tok, SEQ)
    assert data.heldout.shape[0] >= 2 and data.train.shape[0] > 10 * data.heldout.shape[0]
    # Blank-line paragraphs still split on blank lines, wrapped lines kept together.
    wrapped = tmp_path / "wrapped.txt"
    wrapped.write_text("first line\nof one paragraph\n\n  \nsecond paragraph\n")
    assert load_texts(wrapped)[0] == ["first line\nof one paragraph", "second paragraph"]


def test_one_long_document_is_cut_so_a_heldout_set_exists(tmp_path, gpt_tok):
    from ligo_core.data import PIECE_CHARS, build_token_data, cut_document

    book = " ".join(default_corpus_texts()[:200])  # one document, no line breaks
    pieces = cut_document(book)
    assert len(pieces) > 10 and all(len(p) <= PIECE_CHARS for p in pieces)
    assert all(p.endswith(".") for p in pieces[:-1])  # cut at sentence ends
    (tmp_path / "book.txt").write_text(book)
    data = build_token_data(tmp_path / "book.txt", gpt_tok, SEQ)
    assert data.heldout.shape[0] >= 2 and data.train.shape[0] > 0
    held = set(map(tuple, data.heldout.tolist()))
    assert not held & set(map(tuple, data.train.tolist()))


def test_too_little_data_names_what_was_found_and_what_is_needed(tmp_path, gpt_tok):
    from ligo_core.data import build_token_data
    from ligo_core.errors import DataError

    (tmp_path / "tiny.jsonl").write_text('{"text": "a few words"}\n{"text": "and a few more"}\n')
    with pytest.raises(DataError, match=r"holds 2 documents \(2 pieces\), \d+ tokens .* at least 3 sequences of 32"):
        build_token_data(tmp_path / "tiny.jsonl", gpt_tok, SEQ)


def test_the_cli_prints_the_fit_outcome(checkpoint_dir, tmp_path, capsys):
    from ligo_core.cli import main

    assert main(["grow", str(checkpoint_dir("llama")), "--target", "layers=3", "--fit-steps", "2",
                 "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "fit outcome: " in out and ("improved" in out or "kept_start" in out)
