"""Tiny checkpoints of every family, saved the way Hugging Face saves them, with a tokenizer."""

from __future__ import annotations

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ligo_core.data import default_corpus_texts

VOCAB = 384
SPECIALS = ["<|endoftext|>", "[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"]

TINY = {
    "gpt2": ("GPT2LMHeadModel", dict(model_type="gpt2", n_layer=2, n_embd=32, n_head=4, n_positions=64)),
    "gpt2-bare": ("GPT2Model", dict(model_type="gpt2", n_layer=2, n_embd=32, n_head=4, n_positions=64)),
    "bert": ("BertForMaskedLM", dict(model_type="bert", num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)),
    "bert-bare": ("BertModel", dict(model_type="bert", num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                    intermediate_size=64, max_position_embeddings=64)),
    "roberta": ("RobertaForMaskedLM", dict(model_type="roberta", num_hidden_layers=2, hidden_size=32,
                                           num_attention_heads=4, intermediate_size=64, max_position_embeddings=66,
                                           pad_token_id=1)),
    "llama": ("LlamaForCausalLM", dict(model_type="llama", num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                       tie_word_embeddings=False)),
    "llama-tied": ("LlamaForCausalLM", dict(model_type="llama", num_hidden_layers=2, hidden_size=32,
                                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                            max_position_embeddings=64, tie_word_embeddings=True)),
    "mistral": ("MistralForCausalLM", dict(model_type="mistral", num_hidden_layers=2, hidden_size=32,
                                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                           max_position_embeddings=64)),
    "qwen2": ("Qwen2ForCausalLM", dict(model_type="qwen2", num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)),
}
# Deeper and wider, head size kept (1.5x width: not an integer multiple).
TARGET = "layers=4,hidden=48,heads=6,ffn=96"
TARGET_GPT2 = "layers=4,hidden=48,heads=6,ffn=192"


def target_for(name: str) -> str:
    return TARGET_GPT2 if name.startswith("gpt2") else TARGET


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(default_corpus_texts()[:300], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="[PAD]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", unk_token="[UNK]",
    )


def make_model(name: str, seed: int = 0):
    cls_name, cfg = TINY[name]
    config = transformers.AutoConfig.for_model(**{**cfg, "vocab_size": VOCAB})
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so exactness is not an accident
        for n, p in model.named_parameters():
            if "norm" in n.lower() or ".ln_" in n:
                p.add_(torch.randn_like(p) * 0.2)
            elif n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory, tokenizer):
    """Factory: a saved tiny checkpoint directory of a family (cached per session)."""
    cache = {}

    def make(name: str = "gpt2"):
        if name not in cache:
            d = tmp_path_factory.mktemp(f"ckpt-{name}")
            make_model(name).save_pretrained(d)
            tokenizer.save_pretrained(d)
            cache[name] = d
        return cache[name]

    return make
