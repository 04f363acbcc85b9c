"""Fitting data: text files or JSON lines, tokenised with the checkpoint's tokenizer.

Documents are split into train and held-out sets by a stable hash of their text, so the
held-out set is the same whatever order the files come in. Tokens are packed into
fixed-length sequences (documents joined with the tokenizer's separator token).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ligo_core.errors import DataError
from ligo_core.families import MASK_PROBABILITY

DEFAULT_CORPUS = Path(__file__).parent / "corpus" / "wikipedia_en_leads.txt.gz"
DEFAULT_CORPUS_NAME = "wikipedia-en-leads (CC BY-SA 4.0, see ligo_core/corpus/README.md)"
TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".json", ".gz")


def default_corpus_texts() -> list[str]:
    with gzip.open(DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _read_file(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    stem_suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if stem_suffix in (".jsonl", ".json"):
                texts = []
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        raise DataError(f"{path}:{n}: not a JSON line") from None
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise DataError(f"{path}:{n}: JSON line has no string field 'text'")
                    texts.append(record["text"])
                return texts
            # Plain text: paragraphs separated by blank lines are documents.
            return [p.strip() for p in f.read().split("\n\n") if p.strip()]
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None


def load_texts(data: str | Path | None) -> tuple[list[str], str]:
    """Documents from a file or directory of .txt / .jsonl files, or the default corpus."""
    if data is None:
        return default_corpus_texts(), DEFAULT_CORPUS_NAME
    path = Path(data)
    if not path.exists():
        raise DataError(f"data path {str(path)!r} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise DataError(f"data directory {str(path)!r} has no .txt or .jsonl files")
    texts = [t for f in files for t in _read_file(f)]
    if not texts:
        raise DataError(f"data {str(path)!r} holds no text")
    return texts, str(path)


def split_texts(texts: list[str], heldout_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """Stable train / held-out split by a hash of each document."""
    train, heldout = [], []
    cut = int(heldout_fraction * 10_000)
    for t in texts:
        bucket = int.from_bytes(hashlib.sha1(t.encode(), usedforsecurity=False).digest()[:4], "big") % 10_000
        (heldout if bucket < cut else train).append(t)
    if not heldout and len(train) > 1:
        heldout.append(train.pop())
    return train, heldout


def pack_tokens(texts: list[str], tokenizer, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenise and pack documents into a (n, seq_len) tensor of token ids."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
        if max_tokens and len(ids) >= max_tokens:
            break
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(f"data has {len(ids)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@dataclass
class TokenData:
    train: torch.Tensor  # (n, seq_len)
    heldout: torch.Tensor
    source: str

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]


def build_token_data(
    data: str | Path | None, tokenizer, seq_len: int, max_train_tokens: int | None = None,
    max_heldout_tokens: int = 65_536,
) -> TokenData:
    texts, source = load_texts(data)
    train_texts, heldout_texts = split_texts(texts)
    train = pack_tokens(train_texts, tokenizer, seq_len, max_train_tokens)
    heldout = pack_tokens(heldout_texts, tokenizer, seq_len, max_heldout_tokens)
    return TokenData(train=train, heldout=heldout, source=source)


def batches(tokens: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of packed sequences; same seed, same order."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(tokens.shape[0], generator=g)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield tokens[order[start : start + batch_size]]
        if len(order) < batch_size:
            yield tokens[order]


def mask_tokens(input_ids: torch.Tensor, tokenizer_info: dict, generator: torch.Generator,
                probability: float = MASK_PROBABILITY) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: 15% of tokens are targets; of those 80% [MASK], 10% random, 10% kept."""
    labels = input_ids.clone()
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for tid in tokenizer_info.get("special_ids", ()):
        special |= input_ids == tid
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & ~special
    labels[~chosen] = -100
    inputs = input_ids.clone()
    roll = torch.rand(input_ids.shape, generator=generator)
    inputs[chosen & (roll < 0.8)] = tokenizer_info["mask_id"]
    random_pos = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[random_pos] = torch.randint(tokenizer_info["vocab_size"], input_ids.shape, generator=generator)[random_pos]
    return inputs, labels
