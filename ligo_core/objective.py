"""The model's own pretraining loss: next-token for decoders, masked tokens for encoders.

A bare model (no LM head) is scored through its input embedding used as the output layer.
``params`` lets the same code run a model whose weights come from the growth operator
(``torch.func.functional_call``) or the model's own weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ligo_core.data import mask_tokens


def tokenizer_info(tokenizer, config) -> dict:
    """What MLM masking needs: the mask id, vocabulary size and ids never masked.

    Models built without a tokenizer (or one without a mask token) mask with the config's
    ``mask_token_id`` or, failing that, the last id."""
    if tokenizer is not None and getattr(tokenizer, "mask_token_id", None) is not None:
        from ligo_core.tokenizer import tokenizer_info as from_tokenizer

        return {**from_tokenizer(tokenizer), "vocab_size": int(config.vocab_size)}
    mask_id = getattr(config, "mask_token_id", None)
    mask_id = config.vocab_size - 1 if mask_id is None else mask_id
    special = set(getattr(tokenizer, "all_special_ids", []) or []) - {mask_id}
    return {"mask_id": int(mask_id), "vocab_size": int(config.vocab_size), "special_ids": sorted(special)}


def lm_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    objective: str,
    info: dict | None = None,
    generator: torch.Generator | None = None,
    params: dict[str, torch.Tensor] | None = None,
    embedding_name: str | None = None,
) -> torch.Tensor:
    """Mean loss of ``model`` on one batch of packed token ids."""
    if objective == "mlm":
        inputs, labels = mask_tokens(input_ids.cpu(), info, generator or torch.Generator().manual_seed(0))
        inputs, labels = inputs.to(input_ids.device), labels.to(input_ids.device)
    else:
        inputs, labels = input_ids, input_ids

    def run(**kwargs):
        if params is None:
            return model(**kwargs)
        return functional_call(model, params, args=(), kwargs=kwargs, tie_weights=True, strict=False)

    has_head = model.get_output_embeddings() is not None
    if has_head:
        logits = run(input_ids=inputs).logits
    else:
        hidden = run(input_ids=inputs).last_hidden_state
        weight = params[embedding_name] if params is not None else model.get_input_embeddings().weight
        logits = hidden @ weight.t()
    if objective == "clm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    objective: str,
    info: dict | None = None,
    batch_size: int = 16,
    params: dict[str, torch.Tensor] | None = None,
    embedding_name: str | None = None,
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
) -> float:
    """Mean loss over held-out sequences; MLM masks are fixed by a seed so runs compare."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(1234)
    total, count = 0.0, 0
    for n, start in enumerate(range(0, tokens.shape[0], batch_size)):
        if max_batches is not None and n >= max_batches:
            break
        batch = tokens[start : start + batch_size].to(device)
        loss = lm_loss(model, batch, objective, info, g, params, embedding_name)
        total += float(loss) * batch.shape[0]
        count += batch.shape[0]
    model.train(was_training)
    return total / max(count, 1)
