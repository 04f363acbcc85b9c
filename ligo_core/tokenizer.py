"""Train a small byte-level BPE tokenizer on texts, wrapped for ``transformers``.

Used to pretrain tiny models offline (tests, the savings benchmark, the demo): no hub is
reachable here, so the tokenizer is trained in seconds on the shipped corpus.

- ``style="gpt2"``: one special token ``<|endoftext|>`` (bos, eos, unk and pad), no post-processing.
- ``style="bert"``: ``[PAD] [UNK] [CLS] [SEP] [MASK]``; encoding a text adds ``[CLS] ... [SEP]``.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# Special-token strings, not passwords (bandit B105/B106 below).
GPT2_SPECIALS = {"eos_token": "<|endoftext|>"}  # nosec B105
BERT_SPECIALS = {
    "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]",  # nosec B105
}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, style: str = "gpt2",
                    min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of at most ``vocab_size`` entries, specials included."""
    if style not in ("gpt2", "bert"):
        raise ValueError(f"style must be 'gpt2' or 'bert', got {style!r}")
    specials = list(GPT2_SPECIALS.values()) if style == "gpt2" else list(BERT_SPECIALS.values())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if style == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",  # nosec B106
            unk_token="<|endoftext|>", pad_token="<|endoftext|>",
        )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **BERT_SPECIALS)

