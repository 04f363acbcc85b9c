"""Fitting data: text files or JSON lines, tokenised with the checkpoint's tokenizer.

Plain text: blocks separated by blank lines are documents; a file with no blank line (one
paragraph per line, the commonest layout) has one document per line. Documents longer than
``PIECE_CHARS`` are cut into pieces at line or sentence ends, so that one long document cannot
leave the held-out side empty. Pieces are split into train and held-out sets by a stable hash of
their text (the same set whatever order the files come in), and the held-out side is topped up
from the train side, in hash order, until it holds whole sequences. Tokens are packed into
fixed-length sequences (documents joined with the tokenizer's separator token).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ligo_core.catalog import MIN_HELDOUT_SEQUENCES
from ligo_core.errors import DataError
from ligo_core.families import MASK_PROBABILITY

DEFAULT_CORPUS = Path(__file__).parent / "corpus" / "wikipedia_en_leads.txt.gz"
DEFAULT_CORPUS_NAME = "wikipedia-en-leads (CC BY-SA 4.0, see ligo_core/corpus/README.md)"
TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".json", ".gz")
PIECE_CHARS = 2_000  # about 400-500 tokens of English: a few held-out sequences per piece
HELDOUT_FRACTION = 0.05


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
            return plain_text_documents(f.read())
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None


def plain_text_documents(text: str) -> list[str]:
    """Blocks between blank lines, or lines where the text has no blank line."""
    text = text.replace("\r\n", "\n")
    blocks = re.split(r"\n[ \t]*\n", text)
    if len(blocks) == 1:
        blocks = text.split("\n")
    return [b.strip() for b in blocks if b.strip()]


def cut_document(text: str, max_chars: int = PIECE_CHARS) -> list[str]:
    """Pieces of at most about ``max_chars``, cut after a line or sentence end where there is one."""
    pieces = []
    while len(text) > max_chars:
        window = text[:max_chars]
        cut = max(window.rfind("\n"), window.rfind(". "), window.rfind("? "), window.rfind("! "))
        cut = cut + 1 if cut > max_chars // 2 else max_chars
        pieces.append(text[:cut].strip())
        text = text[cut:]
    pieces.append(text.strip())
    return [p for p in pieces if p]


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


def _bucket(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode(), usedforsecurity=False).digest()[:4], "big") % 10_000


def split_texts(texts: list[str], heldout_fraction: float = HELDOUT_FRACTION) -> tuple[list[str], list[str]]:
    """Stable train / held-out split by a hash of each document."""
    train, heldout = [], []
    cut = int(heldout_fraction * 10_000)
    for t in texts:
        (heldout if _bucket(t) < cut else train).append(t)
    if not heldout and len(train) > 1:
        heldout.append(train.pop())
    return train, heldout


def _token_ids(texts: list[str], tokenizer, max_tokens: int | None = None) -> list[int]:
    """Documents' token ids joined by the separator token, stopping once ``max_tokens`` are in."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    ids: list[int] = []
    for start in range(0, len(texts), 256):  # batched: the fast tokenizer runs a batch in parallel
        for doc in tokenizer(texts[start : start + 256], add_special_tokens=False)["input_ids"]:
            ids.extend(doc)
            if sep is not None:
                ids.append(sep)
        if max_tokens and len(ids) >= max_tokens:
            break
    return ids


def _as_sequences(ids: list[int], seq_len: int) -> torch.Tensor:
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def pack_tokens(texts: list[str], tokenizer, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenise and pack documents into a (n, seq_len) tensor of token ids."""
    ids = _token_ids(texts, tokenizer, max_tokens)
    if len(ids) < seq_len:
        raise DataError(f"data has {len(texts)} documents, {len(ids)} tokens: fewer than one sequence of {seq_len}")
    return _as_sequences(ids, seq_len)


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
    """Train and held-out sequences from ``data`` (see the module's docstring for the split)."""
    texts, source = load_texts(data)
    pieces = [p for t in texts for p in cut_document(t)]
    need = MIN_HELDOUT_SEQUENCES * seq_len
    heldout_texts, train_texts = [], []
    held_ids: list[int] = []
    cut = int(HELDOUT_FRACTION * 10_000)
    # Hash order: the held-out side takes its 5% of buckets, then more, until it holds ``need`` tokens.
    for bucket, piece in sorted((_bucket(p), p) for p in pieces):
        if (bucket < cut or len(held_ids) < need) and len(held_ids) < max_heldout_tokens:
            heldout_texts.append(piece)
            held_ids.extend(_token_ids([piece], tokenizer))
        else:
            train_texts.append(piece)
    train_ids = _token_ids(train_texts, tokenizer, max_train_tokens)
    if len(held_ids) < need or len(train_ids) < seq_len:
        total = len(held_ids) + len(train_ids)
        raise DataError(
            f"data {source!r} holds {len(texts)} documents ({len(pieces)} pieces), {total} tokens with this "
            f"checkpoint's tokenizer; fitting needs at least {MIN_HELDOUT_SEQUENCES + 1} sequences of {seq_len} "
            f"tokens ({(MIN_HELDOUT_SEQUENCES + 1) * seq_len}): {MIN_HELDOUT_SEQUENCES} held out to score the "
            f"fit, the rest to fit on. Add text or pass a shorter sequence length"
        )
    heldout = _as_sequences(held_ids[:max_heldout_tokens], seq_len)
    return TokenData(train=_as_sequences(train_ids, seq_len), heldout=heldout, source=source)


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
