"""A job's peak memory from its configs alone, checked against the worker's budget before any work.

No torch here: the API answers 422 at submission from the same numbers the worker checks again.
The estimate is a sum of a few named terms (bytes), each a plain formula of the sizes in the
configs; the biggest one is named in the refusal. docs/GROWTH.md ("Memory plan") has the table.

- ``runtime``: the Python process with torch and transformers imported (measured ~0.6 GiB).
- Streamed apply (fixed strategies, and writing a fitted operator's model without scoring it):
  ``source tensor`` (the largest small tensor, stored dtype) + ``source cache`` (small tensors kept
  once read, at most READ_CACHE_BYTES) + ``output tensor`` (three buffers of the largest large
  tensor in the output dtype: one filled, one queued, one written; and for a fitted operator the
  tensor made whole in fp32; a fixed strategy makes it a block of rows at a time). Nothing else
  grows with the model: shards are written in place, not gathered (ligo_core/stream.py).
- LiGO fit: ``small model`` (fp32) + ``operator`` (fp32 values, gradients and two AdamW moments:
  16 bytes a parameter; with N processes each holds 1/N of the per-layer expanders, FSDP, and the
  values come back whole after the fit: ``operator_bytes``) + ``large layer`` (one large layer's weights, gradients and a recomputed
  copy, fp32) + ``activations`` (a layer's inputs kept for every large layer, one layer's work,
  the logits and their gradient, for batch x seq tokens).
- Scoring (held-out loss, function gap; only when eval tokens > 0 and the checkpoint has a
  tokenizer and an LM head): the ``grown model`` and the ``small model`` in fp32, held at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ligo_core.families import config_sizes, family_for_model_type, global_matrices_of, layer_matrices_of

GiB = 2**30
RUNTIME_BYTES = int(0.6 * GiB)
READ_CACHE_BYTES = GiB  # small tensors a streamed grow keeps once read (ligo_core/weights.ReadCache)
BUDGET_ENV = "LIGO_WORKER_MEMORY_GB"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
# Per-layer tensors of a family's operator that carry a depth-mixing row (upper bound: Llama has 9,
# BERT 16 with biases).
DEPTH_TENSORS_PER_LAYER = 16


@dataclass(frozen=True)
class Shape:
    """The sizes of one model that memory depends on."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    matrices: tuple[tuple[int, int], ...]  # one layer's weight matrices (families.layer_matrices_of)
    globals: tuple[tuple[int, int], ...]  # embeddings, head transform, untied head (families.global_matrices_of)

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_parameters(self) -> int:
        """One layer's weight matrices and its four norm or bias vectors of ``hidden``."""
        return sum(o * i for o, i in self.matrices) + 4 * self.hidden

    def parameters(self) -> int:
        return sum(o * i for o, i in self.globals) + self.layers * self.layer_parameters()

    def largest_tensor(self) -> int:
        """Elements of the largest single tensor (GPT-2 fuses q, k and v into one)."""
        return max(self.vocab * self.hidden, self.hidden * self.ffn, self.hidden * (self.q + 2 * self.kv))


def shape_of(config: dict) -> Shape:
    """A Shape from a config.json dict (or a transformers config's ``to_dict()``), read with the
    engine's own size fields and weight-matrix lists (ligo_core/families.py)."""
    family = family_for_model_type(config.get("model_type"))
    if family is None:
        raise ValueError(f"no family for model_type {config.get('model_type')!r}")
    sizes = config_sizes(family, config.get)
    return Shape(sizes["layers"], sizes["hidden"], sizes["heads"], sizes["kv_heads"], sizes["head_dim"], sizes["ffn"],
                 int(config["vocab_size"]), tuple(layer_matrices_of(family, sizes)),
                 tuple(global_matrices_of(family, sizes, config.get)))


def dtype_bytes(config: dict, dtype: str | None = None) -> int:
    """Bytes per output element: ``dtype`` when named, else the config's, else fp32."""
    name = dtype if dtype not in (None, "auto") else (config.get("dtype") or config.get("torch_dtype") or "float32")
    return DTYPE_BYTES.get(str(name).replace("torch.", ""), 4)


def operator_parts(small: Shape, large: Shape, depth_tensors: int = DEPTH_TENSORS_PER_LAYER) -> tuple[int, int]:
    """LiGO's learnable entries as (whole on every process, per large layer): ``[diag; C]``
    expanders on both sides (the residual stream once, the head, KV and FFN spaces per large layer)
    and the depth-mixing rows (an L2 x L1 matrix for each of ``depth_tensors`` per-layer tensors;
    the default is an upper bound over the families). Several processes shard the per-layer part
    (ligo_core/sharding.py)."""
    def expander(d1: int, d2: int) -> int:
        return 2 * (d1 + (d2 - d1) * d1)

    per_layer = expander(small.q, large.q) + 2 * expander(small.kv, large.kv) + expander(small.ffn, large.ffn)
    depth = depth_tensors * large.layers * small.layers
    return expander(small.hidden, large.hidden) + depth, per_layer


def operator_parameters(small: Shape, large: Shape, depth_tensors: int = DEPTH_TENSORS_PER_LAYER) -> int:
    whole, per_layer = operator_parts(small, large, depth_tensors)
    return whole + large.layers * per_layer


def operator_bytes(small: Shape, large: Shape, processes: int = 1,
                   depth_tensors: int = DEPTH_TENSORS_PER_LAYER) -> int:
    """One process's operator while fitting: values, gradients and two AdamW moments (16 bytes an
    entry) of the whole part and of its 1/N of the per-layer part, plus, sharded, one large layer's
    values and gradients gathered; or, after the fit, every value gathered back (4 bytes an entry)
    if that is more."""
    whole, per_layer = operator_parts(small, large, depth_tensors)
    if processes == 1:
        return 16 * (whole + large.layers * per_layer)
    fitting = 16 * (whole + -(-large.layers * per_layer // processes)) + 2 * 4 * per_layer
    return max(fitting, 4 * (whole + large.layers * per_layer))


def plan(source: dict, target: dict, *, strategy: str, fit_steps: int = 0, batch_size: int = 8,
         seq_len: int = 512, scored: bool = False, dtype: str | None = None, processes: int = 1) -> dict:
    """Peak bytes by term for a job (for one of its processes), the total and the biggest term.

    ``scored``: held-out scoring will run (eval tokens > 0, and the checkpoint has a tokenizer and
    an LM head), which holds the grown and the small model in memory. ``processes``: the fit runs
    in that many, each with its share of the global batch and of the sharded operator."""
    small, large = shape_of(source), shape_of(target)
    out_bytes = dtype_bytes(source, dtype)
    terms = {"runtime": RUNTIME_BYTES}
    fitting = strategy == "ligo" and fit_steps > 0
    if scored or fitting:
        terms["small model"] = 4 * small.parameters()
    if fitting:
        rows = -(-batch_size // processes)  # the largest rank's share of the global batch
        tokens = rows * seq_len
        terms["operator"] = operator_bytes(small, large, processes)
        terms["large layer"] = 3 * 4 * (large.layer_parameters() + large.vocab * large.hidden)
        terms["activations"] = 4 * tokens * (large.layers * large.hidden + 20 * large.hidden + 4 * large.ffn
                                             + 3 * large.vocab) + 2 * 4 * rows * large.heads * seq_len ** 2
    if scored:
        terms["grown model"] = 4 * large.parameters()
    else:
        stored = dtype_bytes(source)
        terms["source tensor"] = stored * small.largest_tensor()
        terms["source cache"] = min(READ_CACHE_BYTES, stored * small.parameters())
        # a fixed strategy's tensors are made by blocks into the buffers; a fitted operator's whole, in fp32
        terms["output tensor"] = (3 * out_bytes + (4 if strategy == "ligo" else 0)) * large.largest_tensor()
    total = sum(terms.values())
    biggest = max((k for k in terms if k != "runtime"), key=terms.get)
    return {"bytes": total, "gib": round(total / GiB, 2), "terms": terms, "biggest": biggest}


def budget_bytes(memory_gb: float | None = None, device: str | None = None) -> tuple[int, str]:
    """The worker's memory budget and where it came from: ``memory_gb`` when given, else
    LIGO_WORKER_MEMORY_GB, else the CUDA device's memory (a CUDA ``device``), else the machine's
    available memory."""
    if memory_gb is not None:
        return int(memory_gb * GiB), "given"
    env = os.environ.get(BUDGET_ENV)
    if env:
        try:
            return int(float(env) * GiB), BUDGET_ENV
        except ValueError:
            raise ValueError(f"{BUDGET_ENV}={env!r} is not a number of GiB") from None
    if device and device.startswith("cuda"):
        import torch  # the worker's side only: it has torch, and a CUDA device to ask

        index = int(device.split(":")[1]) if ":" in device else 0
        return int(torch.cuda.get_device_properties(index).total_memory), f"{device} memory"
    return _available_ram(), "available RAM"


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def refusal(estimate: dict, budget: int, source: str) -> str | None:
    """Why the job cannot run within ``budget`` bytes, or None when it fits."""
    if estimate["bytes"] <= budget:
        return None
    biggest = estimate["biggest"]
    return (f"the job needs about {estimate['bytes'] / GiB:.1f} GiB of memory, above the worker's budget of "
            f"{budget / GiB:.1f} GiB ({source}); the biggest term is the {biggest} "
            f"({estimate['terms'][biggest] / GiB:.1f} GiB). Grow to a smaller target, use a fixed strategy "
            f"without scoring (eval tokens 0), or a smaller fitting batch")
