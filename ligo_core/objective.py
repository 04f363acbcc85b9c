"""The model's own pretraining loss: next-token for decoders, masked tokens for encoders.

A bare model (no LM head) is scored through its input embedding used as the output layer.
``params`` lets the same code run a model whose weights come from the growth operator
(``torch.func.functional_call``) or the model's own weights.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ligo_core.data import mask_tokens
from ligo_core.families import family_for_model_type


def tokenizer_info(tokenizer, config=None) -> dict:
    """What MLM masking needs (``ligo_core.data.mask_tokens``): the mask id, vocabulary size and
    ids never masked.

    The vocabulary is the model's (``config``) where given, else the tokenizer's. Models built
    without a tokenizer (or one without a mask token) mask with the config's ``mask_token_id``
    or, failing that, the last id; with neither a config nor a mask token the mask id is None
    and an MLM loss refuses it."""
    has_mask = tokenizer is not None and getattr(tokenizer, "mask_token_id", None) is not None
    if has_mask or config is None:
        mask_id = tokenizer.mask_token_id
        return {
            "special_ids": sorted(set(tokenizer.all_special_ids) - {mask_id}),
            "mask_id": mask_id,
            "vocab_size": int(config.vocab_size) if config is not None else len(tokenizer),
        }
    mask_id = getattr(config, "mask_token_id", None)
    mask_id = config.vocab_size - 1 if mask_id is None else mask_id
    special = set(getattr(tokenizer, "all_special_ids", []) or []) - {mask_id}
    return {"mask_id": int(mask_id), "vocab_size": int(config.vocab_size), "special_ids": sorted(special)}


OBJECTIVES = ("clm", "mlm")


def loss_terms(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    objective: str,
    info: dict | None = None,
    generator: torch.Generator | None = None,
    params: dict[str, torch.Tensor] | None = None,
    embedding_name: str | None = None,
) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of target tokens) of ``model`` on one batch of packed ids.

    The loss is computed here from the logits, not by the model, so that causal (next-token)
    and masked (BERT 15%, 80/10/10) objectives are counted the same way. A masked LM's output
    layer sees only the masked positions: the same loss as scoring every position and
    ignoring the rest, at a fraction of the cost (the vocabulary-wide product and softmax
    are about 40% of a small BERT's CPU training step).
    """
    if objective == "mlm":
        if info is None or info.get("mask_id") is None:
            raise ValueError("MLM needs tokenizer_info with a mask_id (see ligo_core.tokenizer.tokenizer_info)")
        inputs, labels = mask_tokens(input_ids.cpu(), info, generator or torch.Generator().manual_seed(0))
        inputs, labels = inputs.to(input_ids.device), labels.to(input_ids.device)
        scored = labels != -100
    elif objective == "clm":
        # Next-token targets, the last position's ignored: the logits stay one contiguous block
        # (slicing them instead costs a copy the size of the vocabulary-wide output).
        inputs, scored = input_ids, None
        labels = F.pad(input_ids[:, 1:], (0, 1), value=-100)
    else:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")

    def run(**kwargs):
        if params is None:
            return model(**kwargs)
        return functional_call(model, params, args=(), kwargs=kwargs, tie_weights=True, strict=False)

    if model.get_output_embeddings() is not None:
        with _only_positions(_output_head(model), scored):
            logits = run(input_ids=inputs).logits
    else:
        hidden = run(input_ids=inputs).last_hidden_state
        if scored is not None:
            hidden = hidden[scored]
        weight = params[embedding_name] if params is not None else model.get_input_embeddings().weight
        logits = hidden @ weight.t()
    if objective == "mlm":
        labels = labels[scored]  # logits are (masked positions, vocabulary) already
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                            reduction="sum")
    return total, int((labels != -100).sum())


def _output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The module from final hidden states to logits: the family's whole MLM head (its dense
    transform too) where the family table names one, else the output embedding."""
    family = family_for_model_type(getattr(model.config, "model_type", ""))
    return model.get_submodule(family.mlm_head) if family and family.mlm_head else model.get_output_embeddings()


@contextmanager
def _only_positions(output_layer: torch.nn.Module, positions: torch.Tensor | None):
    """While active, ``output_layer`` receives only the hidden states at ``positions`` (a boolean
    (batch, seq) mask), so the model's logits come out as (selected positions, vocabulary)."""
    if positions is None:
        yield
        return
    handle = output_layer.register_forward_pre_hook(lambda _module, args: (args[0][positions], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def lm_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    objective: str,
    info: dict | None = None,
    generator: torch.Generator | None = None,
    params: dict[str, torch.Tensor] | None = None,
    embedding_name: str | None = None,
) -> torch.Tensor:
    """Mean loss per target token of ``model`` on one batch of packed token ids."""
    total, count = loss_terms(model, input_ids, objective, info, generator, params, embedding_name)
    return total / max(count, 1)


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    objective: str,
    info: dict | None = None,
    batch_size: int = 16,
    params: dict[str, torch.Tensor] | None = None,
    embedding_name: str | None = None,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    seed: int = 1234,
) -> float:
    """Mean loss per target token over held-out sequences ``tokens`` (n, seq_len), on ``device``
    (default: where the model's weights are, else the CPU).

    Deterministic: no dropout, and MLM masks drawn from ``seed`` (the same masks for every model
    scored with the same seed and tokens), so runs compare.
    """
    if device is None:  # where the weights are (a skeleton's are on "meta": its buffers say)
        held = [t.device for t in (*model.parameters(), *model.buffers()) if t.device.type != "meta"]
        device = held[0] if held else torch.device("cpu")
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for n, start in enumerate(range(0, tokens.shape[0], batch_size)):
        if max_batches is not None and n >= max_batches:
            break
        batch = tokens[start : start + batch_size].to(device)
        s, c = loss_terms(model, batch, objective, info, g, params, embedding_name)
        total += float(s)
        count += c
    model.train(was_training)
    return total / max(count, 1)
