"""Model families described as data.

Every tensor of a family is one row: its name (``{i}`` stands for the layer index), and for
each of its dimensions the *space* it lives in and the *side* of the growth operator that
expands it. The operator code reads these tables and never mentions a family by name.

Spaces: ``res`` is the residual stream (one expander for the whole model); ``q``, ``k``, ``v``
(attention heads) and ``ffn`` (feed-forward units) have one expander per large layer.
``None`` is a dimension that never grows (vocabulary, positions, token types).

Sides: ``E`` writes into a space (a layer's output, an embedding row, a bias, a norm gain);
``F`` reads from it (a layer's input). For a copied unit, ``E`` copies and ``F`` divides by the
number of copies, so ``F^T E = I`` and the function is kept.

``H`` is the side of a norm that feeds the LM head: ``F`` when the head is tied to the input
embedding (the head then reads through the embedding's ``E``), ``E`` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

Dim = tuple[str, str] | None  # (space, side) or None for a dimension that is not expanded


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[Dim, ...]
    stored_transposed: bool = False  # GPT-2's Conv1D keeps weights as (in, out)
    fused: tuple[str, ...] = ()  # output dim is these spaces concatenated (GPT-2's c_attn)
    norm_gain: bool = False  # a norm's gain: rescaled for the wider norm's statistics
    optional: bool = False  # present in some members of the family only (Qwen2's q/k/v biases)
    block_output: bool = False  # writes a block's result into the residual stream (zeroed in new blocks)

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.name


MASK_PROBABILITY = 0.15  # the "mlm" objective's share of tokens masked and scored (BERT's)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    objective: str  # "clm" (next token) or "mlm" (masked tokens)
    norm: str  # "layernorm" pads new residual units with the mean, "rmsnorm" with zero
    post_norm: bool  # the norm sits on the residual stream itself (BERT): exact only for k x width
    rotary: bool
    config_keys: dict[str, str]  # our field name -> HF config attribute
    eps_key: str  # the norm epsilon's config attribute
    base_prefixes: tuple[str, ...]  # prefix of the bare model inside the LM-head model
    base: tuple[TensorSpec, ...]
    head: tuple[TensorSpec, ...] = ()  # tensors outside the bare model
    tied_head: str = ""  # head tensor that is tied to the input embedding when tie_word_embeddings
    embedding: str = ""  # base tensor of the input embedding
    aliases: tuple[str, ...] = ()  # head tensors that HF ties to another one and saves twice
    lm_classes: tuple[str, ...] = ()
    mlm_head: str = ""  # module from final hidden states to logits, run on the masked positions only


def _lin(name, out, inp, *, transposed=False, bias=True, fused=(), optional_bias=False, block_output=False):
    """A linear layer's weight (and bias), given the spaces of its output and input."""
    out_dim = ("+".join(fused), "E") if fused else (out, "E")
    rows = [TensorSpec(f"{name}.weight", (out_dim, (inp, "F")), stored_transposed=transposed, fused=fused,
                       block_output=block_output)]
    if bias or optional_bias:
        rows.append(TensorSpec(f"{name}.bias", (out_dim,), fused=fused, optional=optional_bias,
                               block_output=block_output))
    return rows


def _norm(name, side="E", bias=True):
    rows = [TensorSpec(f"{name}.weight", (("res", side),), norm_gain=True)]
    if bias:
        rows.append(TensorSpec(f"{name}.bias", (("res", side),)))
    return rows


def _emb(name):
    return TensorSpec(f"{name}.weight", (None, ("res", "E")))


GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    objective="clm",
    norm="layernorm",
    post_norm=False,
    rotary=False,
    config_keys={"layers": "n_layer", "hidden": "n_embd", "heads": "n_head", "ffn": "n_inner"},
    eps_key="layer_norm_epsilon",
    base_prefixes=("transformer.", ""),
    embedding="wte.weight",
    base=(
        _emb("wte"),
        _emb("wpe"),
        *_norm("h.{i}.ln_1"),
        *_lin("h.{i}.attn.c_attn", None, "res", transposed=True, fused=("q", "k", "v")),
        *_lin("h.{i}.attn.c_proj", "res", "q", transposed=True, block_output=True),
        *_norm("h.{i}.ln_2"),
        *_lin("h.{i}.mlp.c_fc", "ffn", "res", transposed=True),
        *_lin("h.{i}.mlp.c_proj", "res", "ffn", transposed=True, block_output=True),
        *_norm("ln_f", side="H"),
    ),
    head=(TensorSpec("lm_head.weight", (None, ("res", "F"))),),
    tied_head="lm_head.weight",
    lm_classes=("GPT2LMHeadModel",),
)


def _bert_like(name, model_types, head_prefix, head_norm, decoder, head_bias, lm_class, mlm_head):
    layer = "encoder.layer.{i}"
    return Family(
        name=name,
        model_types=model_types,
        objective="mlm",
        norm="layernorm",
        post_norm=True,
        rotary=False,
        config_keys={
            "layers": "num_hidden_layers",
            "hidden": "hidden_size",
            "heads": "num_attention_heads",
            "ffn": "intermediate_size",
        },
        eps_key="layer_norm_eps",
        base_prefixes=(f"{name}.", ""),
        embedding="embeddings.word_embeddings.weight",
        base=(
            _emb("embeddings.word_embeddings"),
            _emb("embeddings.position_embeddings"),
            _emb("embeddings.token_type_embeddings"),
            *_norm("embeddings.LayerNorm"),
            *_lin(f"{layer}.attention.self.query", "q", "res"),
            *_lin(f"{layer}.attention.self.key", "k", "res"),
            *_lin(f"{layer}.attention.self.value", "v", "res"),
            *_lin(f"{layer}.attention.output.dense", "res", "q", block_output=True),
            *_norm(f"{layer}.attention.output.LayerNorm"),
            *_lin(f"{layer}.intermediate.dense", "ffn", "res"),
            *_lin(f"{layer}.output.dense", "res", "ffn", block_output=True),
            *_norm(f"{layer}.output.LayerNorm"),
            *[
                TensorSpec(t.name, t.dims, optional=True)
                for t in _lin("pooler.dense", "res", "res")
            ],
        ),
        head=(
            *_lin(f"{head_prefix}.dense", "res", "res"),
            *_norm(head_norm, side="H"),
            TensorSpec(f"{decoder}.weight", (None, ("res", "F"))),
            TensorSpec(head_bias, (None,)),
        ),
        tied_head=f"{decoder}.weight",
        aliases=(f"{decoder}.bias",),  # always the same tensor as the head bias
        lm_classes=(lm_class,),
        mlm_head=mlm_head,
    )


BERT = _bert_like(
    "bert",
    ("bert",),
    head_prefix="cls.predictions.transform",
    head_norm="cls.predictions.transform.LayerNorm",
    decoder="cls.predictions.decoder",
    head_bias="cls.predictions.bias",
    lm_class="BertForMaskedLM",
    mlm_head="cls",
)

ROBERTA = _bert_like(
    "roberta",
    ("roberta",),
    head_prefix="lm_head",
    head_norm="lm_head.layer_norm",
    decoder="lm_head.decoder",
    head_bias="lm_head.bias",
    lm_class="RobertaForMaskedLM",
    mlm_head="lm_head",
)

LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    objective="clm",
    norm="rmsnorm",
    post_norm=False,
    rotary=True,
    config_keys={
        "layers": "num_hidden_layers",
        "hidden": "hidden_size",
        "heads": "num_attention_heads",
        "kv_heads": "num_key_value_heads",
        "ffn": "intermediate_size",
        "head_dim": "head_dim",
    },
    eps_key="rms_norm_eps",
    base_prefixes=("model.", ""),
    embedding="embed_tokens.weight",
    base=(
        _emb("embed_tokens"),
        *_norm("layers.{i}.input_layernorm", bias=False),
        *_lin("layers.{i}.self_attn.q_proj", "q", "res", bias=False, optional_bias=True),
        *_lin("layers.{i}.self_attn.k_proj", "k", "res", bias=False, optional_bias=True),
        *_lin("layers.{i}.self_attn.v_proj", "v", "res", bias=False, optional_bias=True),
        *_lin("layers.{i}.self_attn.o_proj", "res", "q", bias=False, block_output=True),
        *_norm("layers.{i}.post_attention_layernorm", bias=False),
        *_lin("layers.{i}.mlp.gate_proj", "ffn", "res", bias=False),
        *_lin("layers.{i}.mlp.up_proj", "ffn", "res", bias=False),
        *_lin("layers.{i}.mlp.down_proj", "res", "ffn", bias=False, block_output=True),
        *_norm("norm", side="H", bias=False),
    ),
    head=(TensorSpec("lm_head.weight", (None, ("res", "F"))),),
    tied_head="lm_head.weight",
    lm_classes=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
)

FAMILIES: tuple[Family, ...] = (GPT2, BERT, ROBERTA, LLAMA)


def family_for_model_type(model_type: str) -> Family | None:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return None


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


# ---- sizes and weight matrices from a config's values (no transformers: the memory plan reads a
# config.json dict, the engine a PretrainedConfig; both pass a getter) ----------------------------

@dataclass(frozen=True)
class MatrixShape:
    """What a family's weight matrices are, beyond the six sizes."""

    ffn_inputs: int  # FFN input projections: 1, or 2 for a gated FFN (SwiGLU: gate and up)
    head_transform: bool  # a dense hidden x hidden layer before the LM decoder (BERT, RoBERTa)
    positions: str | None  # config attribute of a learned position table
    token_types: str | None  # config attribute of a token-type table


MATRIX_SHAPES = {
    "gpt2": MatrixShape(1, False, "n_positions", None),
    "bert": MatrixShape(1, True, "max_position_embeddings", "type_vocab_size"),
    "roberta": MatrixShape(1, True, "max_position_embeddings", "type_vocab_size"),
    "llama": MatrixShape(2, False, None, None),
}


def config_sizes(family: Family, get) -> dict[str, int]:
    """The size fields of a config (``get``: attribute name -> value or None), with derived values
    (GPT-2's n_inner=None is 4 x hidden)."""
    value = {f: get(key) for f, key in family.config_keys.items()}
    hidden, heads = int(value["hidden"]), int(value["heads"])
    return {
        "layers": int(value["layers"]),
        "hidden": hidden,
        "heads": heads,
        "kv_heads": int(value.get("kv_heads") or heads),
        "ffn": int(value["ffn"] or 4 * hidden),
        "head_dim": int(value.get("head_dim") or hidden // heads),
    }


def layer_matrices_of(family: Family, sizes: dict[str, int]) -> list[tuple[int, int]]:
    """(out, in) of every weight matrix of one layer: Q, K, V, O, FFN in (x1 or x2), FFN out."""
    h, q, kv, f = sizes["hidden"], sizes["heads"] * sizes["head_dim"], sizes["kv_heads"] * sizes["head_dim"], sizes["ffn"]
    return [(q, h), (kv, h), (kv, h), (h, q)] + [(f, h)] * MATRIX_SHAPES[family.name].ffn_inputs + [(h, f)]


def global_matrices_of(family: Family, sizes: dict[str, int], get) -> list[tuple[int, int]]:
    """(rows, hidden) of the embedding tables, the head transform and an untied LM head. An absent
    ``tie_word_embeddings`` takes the family's default (tied, but not under rotary positions)."""
    shape, h = MATRIX_SHAPES[family.name], sizes["hidden"]
    rows = [get("vocab_size")] + [get(a) or 0 for a in (shape.positions, shape.token_types) if a]
    mats = [(int(r), h) for r in rows]
    if shape.head_transform:
        mats.append((h, h))
    tied = get("tie_word_embeddings")
    if not (tied if tied is not None else not family.rotary):
        mats.append((int(get("vocab_size")), h))
    return mats
