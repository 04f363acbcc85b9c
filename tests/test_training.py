"""The plain training loop lowers loss; held-out evaluation is deterministic; the tokenizer."""

import ctypes
import ctypes.util
import math

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

from ligo_core.allocator import keep_freed_memory
from ligo_core.data import batches, default_corpus_texts, pack_tokens
from ligo_core.tokenizer import tokenizer_info, train_tokenizer
from ligo_core.training import evaluate_loss, lr_at, train

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
    before = evaluate_loss(model, heldout, "clm")
    assert before == pytest.approx(math.log(len(gpt_tok)), abs=0.3)  # a fresh model is near uniform
    hist = train(model, batches(train_tokens, 8, seed=0), 60, lr=3e-3, warmup=5, objective="clm",
                 eval_every=20, eval_fn=lambda m: evaluate_loss(m, heldout, "clm"))
    after = evaluate_loss(model, heldout, "clm")
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
    first = evaluate_loss(model, heldout, "mlm", tokenizer_info=info, seed=7)
    assert evaluate_loss(model, heldout, "mlm", tokenizer_info=info, seed=7) == first
    assert evaluate_loss(model, heldout, "mlm", tokenizer_info=info, seed=8) != first
    train(model, batches(train_tokens, 8, seed=0), 60, lr=3e-3, warmup=5, objective="mlm", tokenizer_info=info)
    assert evaluate_loss(model, heldout, "mlm", tokenizer_info=info, seed=7) < first - 0.7


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
        evaluate_loss(_gpt(gpt_tok), tokens, "mlm", tokenizer_info=tokenizer_info(gpt_tok))


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
