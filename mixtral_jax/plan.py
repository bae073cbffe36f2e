"""Per-device memory of a model on a mesh, without allocating anything.

Weights and the KV cache come from `jax.eval_shape` of `init_params` / `init_cache` and the same
logical-axis shardings the model runs with (mixtral_jax.sharding). Activations are the buffers of one
layer live at once, counted from the shapes of this implementation, for the larger of a prefill
step (T = `prompt_len` tokens per row, or `prefill_chunk` when the prompt is longer) and a decode
step (T = 1) against the cache:

- the residual stream, its normed copy and the attention output [B, T, D] (x 3);
- q [B, T, N, H] and the attention output, k and v [B, T, K, H];
- blockwise attention: one tile of scores and probabilities [B, N, 256, 256] float32 (x 2);
- the MoE: with experts split over the mesh (einsum), the dispatch/combine masks [g, t, E, C]
  float32 (x 2, dropless C = t = routing group), expert inputs/outputs [g, E, C, D] and gate/up
  [g, E, C, F] (x 2 each); on one expert shard (sorted), the rows gathered in expert order
  [B·T·X, D] and their outputs [B·T·X, D] float32 (x 2; XLA reuses the first for the per-slot
  outputs). Not counted: stacked expert weights, which XLA on CPU copies expert by expert before
  use (one layer's experts: what `load` avoids with its split CPU layout);
- logits [B, V] float32 at the last position.

Checked against XLA's own `memory_analysis()` of the compiled prefill on the tiny config (tests).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from .config import MixtralConfig
from .attention import DEFAULT_BLOCK
from .kvcache import is_int8
from .model import ParamSpec, init_cache, init_params, param_specs
from .moe import DEFAULT_GROUP_SIZE
from .quant import CONTRACTED, HEAD_DTYPE
from .sharding import shard_shape

GROUPS = {"embed": "embeddings", "lm_head": "embeddings", "wq": "attention", "wk": "attention",
          "wv": "attention", "wo": "attention", "w_gate": "experts", "w_up": "experts", "w_down": "experts",
          "router": "norms_router", "attn_norm": "norms_router", "ffn_norm": "norms_router",
          "final_norm": "norms_router"}
KV_AXES = ("batch", "cache_sequence", "kv_heads", "head_dim")  # scales: the first three


def _bytes(shape, axes, mesh_sizes, itemsize) -> int:
    return math.prod(shard_shape(shape, axes, mesh_sizes)) * itemsize


def plan_memory(config: MixtralConfig, mesh_sizes: dict[str, int], *, dtype="bfloat16", batch: int = 1,
                max_seq_len: int | None = None, prompt_len: int = 512,
                quantize: str | None = None, kv_dtype=None, prefill_chunk: int | None = None) -> dict[str, Any]:
    """Per-device bytes of weights (by group), KV cache and activations.

    Args:
      config: the model.
      mesh_sizes: {"data": d, "expert": e, "tensor": t}.
      dtype: weight, cache and activation dtype.
      batch: rows decoded together.
      max_seq_len: KV cache length per row (default: the model's context).
      prompt_len: prefill length per row for the activation estimate.
      quantize: "int8" for int8 expert and attention matrices (1 byte each plus a float32 scale
        per output channel) and a bfloat16 lm_head, as mixtral_jax.quant stores them.
      kv_dtype: KV cache dtype ("int8": 1 byte per number plus a float32 scale per token and head,
        mixtral_jax.kvcache); None for `dtype`.
      prefill_chunk: prompt tokens per prefill step (None or 0: the whole prompt).
    Returns:
      {"weights": {group: bytes}, "weights_total", "kv_cache", "activations" (the larger of
      "prefill_activations" and "decode_activations"), "total"}, per device.
    """
    itemsize = np.dtype(dtype).itemsize
    seq = config.max_seq_len if max_seq_len is None else max_seq_len
    if not 1 <= seq <= config.max_seq_len:
        raise ValueError(f"max_seq_len must be in [1, {config.max_seq_len}], got {seq}")
    if batch < 1 or prompt_len < 1:
        raise ValueError("batch and prompt_len must be >= 1")
    shapes = jax.eval_shape(lambda: init_params(config, dtype=dtype))
    specs = param_specs(config)
    weights: dict[str, int] = dict.fromkeys(sorted(set(GROUPS.values())), 0)

    def add(path, spec: ParamSpec, shaped):
        leaf = path[-1].key
        if quantize and leaf in CONTRACTED:
            kept = {a % len(spec.shape) for a in CONTRACTED[leaf]}
            scale = tuple(1 if a in kept else n for a, n in enumerate(shaped.shape))
            n_bytes = _bytes(shaped.shape, spec.axes, mesh_sizes, 1) + _bytes(scale, spec.axes, mesh_sizes, 4)
        elif quantize and leaf == "lm_head":
            n_bytes = _bytes(shaped.shape, spec.axes, mesh_sizes, np.dtype(HEAD_DTYPE).itemsize)
        else:
            n_bytes = _bytes(shaped.shape, spec.axes, mesh_sizes, itemsize)
        weights[GROUPS[leaf]] += n_bytes

    jax.tree_util.tree_map_with_path(add, specs, shapes, is_leaf=lambda x: isinstance(x, ParamSpec))
    cache = jax.eval_shape(lambda: init_cache(config, batch, seq, dtype=kv_dtype or dtype))
    kv = sum(_bytes(a.shape, KV_AXES[:a.ndim], mesh_sizes, a.dtype.itemsize)
             for name, layer in cache.items() if name.startswith("layers_") for a in layer.values())
    step = min(prompt_len, seq, prefill_chunk or prompt_len)
    prefill = activation_bytes(config, mesh_sizes, itemsize, batch, step)
    decode = activation_bytes(config, mesh_sizes, itemsize, batch, 1)
    total_weights = sum(weights.values())
    activations = max(prefill, decode)
    return {"weights": weights, "weights_total": total_weights, "kv_cache": kv, "activations": activations,
            "prefill_activations": prefill, "decode_activations": decode,
            "kv_dtype": "int8" if is_int8(kv_dtype) else np.dtype(kv_dtype or dtype).name,
            "total": total_weights + kv + activations}


def activation_bytes(c: MixtralConfig, mesh, itemsize: int, b: int, t: int) -> int:
    """Bytes per device of one layer's live buffers for a step of t tokens per row (module docstring)."""
    f32 = 4
    act = ("batch", "sequence", "act_embed")
    q_axes, kv_axes = ("batch", "sequence", "q_heads", "head_dim"), ("batch", "sequence", "kv_heads", "head_dim")
    tile = min(t, DEFAULT_BLOCK)
    parts = [
        3 * _bytes((b, t, c.d_model), act, mesh, itemsize),
        2 * _bytes((b, t, c.n_heads, c.head_dim), q_axes, mesh, itemsize),
        2 * _bytes((b, t, c.n_kv_heads, c.head_dim), kv_axes, mesh, itemsize),
        2 * _bytes((b, c.n_heads, tile, DEFAULT_BLOCK), ("batch", "q_heads", None, None), mesh, f32),
        _bytes((b, c.vocab_size), ("batch", "vocab"), mesh, f32),
    ]
    if mesh.get("expert", 1) > 1:  # einsum dispatch, as `auto` picks on an expert-split mesh
        tokens = b * t
        group = min(DEFAULT_GROUP_SIZE, tokens)
        g = -(-tokens // group)
        parts += [
            2 * _bytes((g, group, c.n_experts, group), ("token_groups", None, "experts_replicated", "capacity"),
                       mesh, f32),
            2 * _bytes((g, c.n_experts, group, c.d_model), ("groups", "experts", "capacity", "act_embed"), mesh, itemsize),
            2 * _bytes((g, c.n_experts, group, c.d_ff), ("groups", "experts", "capacity", "ffw"), mesh, itemsize),
        ]
    else:  # sorted: rows in expert order and their outputs
        parts.append(2 * _bytes((b * t * c.top_k, c.d_model), ("batch", "act_embed"), mesh, f32))
    return sum(parts)


def parse_bytes(text: str) -> int:
    """'16GB' / '80 GB' / '512MB' / '1.5e9' -> bytes (decimal units)."""
    units = {"TB": 1e12, "GB": 1e9, "MB": 1e6, "KB": 1e3, "B": 1}
    t = text.strip().upper()
    for unit, scale in units.items():
        if t.endswith(unit):
            number = t[:-len(unit)].strip()
            break
    else:
        number, scale = t, 1
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"bad memory size {text!r}: expected e.g. 16GB") from None
    if not value > 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return int(value)


def _tree_bytes(config: MixtralConfig, mesh_sizes, itemsize: int) -> int:
    specs = jax.tree.leaves(param_specs(config), is_leaf=lambda x: isinstance(x, ParamSpec))
    return sum(_bytes(s.shape, s.axes, mesh_sizes, itemsize) for s in specs)


def plan_training(config: MixtralConfig, mesh_sizes: dict[str, int], *, batch: int, seq_len: int,
                  remat: str = "none", compute_dtype="bfloat16", lora=None) -> dict[str, Any]:
    """Per-device bytes of a training step (AdamW), nothing allocated.

    Full training keeps float32 master parameters, float32 gradients and two float32 moments, all
    sharded as the parameters are (`fsdp` splits d_model, `expert` the experts, `tensor` heads and
    d_ff), plus a `compute_dtype` copy of the parameters when that is not float32. LoRA (a
    mixtral_jax.lora.LoraConfig) keeps the base in `compute_dtype` and trains a replicated float32
    adapter (its gradients and moments). Activations are an estimate for `batch` rows of `seq_len`
    tokens split over `data` x `fsdp` (what the backward pass keeps per layer):
    - remat "none": per layer the residual and normed inputs, q/k/v and the attention output, the
      materialised float32 scores and probabilities [B, N, S, S], the MoE's rows in expert order
      [B·S·top_k, D] and its gate/up/activation outputs [B·S·top_k, F] (x 3);
    - "dots": the same less the scores, probabilities and normed copies (recomputed);
    - "layer": each layer's input [B, S, D] only, plus one layer's "none" set while it is recomputed;
    - plus the float32 logits and their gradient [B·S, V] (x 2).
    Returns:
      {"parameters", "compute_copy", "gradients", "optimizer_state", "activations", "total",
      "trainable_params"}.
    """
    from .lora import count_adapter_params

    if remat not in ("none", "layer", "dots"):
        raise ValueError(f"remat must be none, layer or dots, got {remat!r}")
    if batch < 1 or seq_len < 1:
        raise ValueError("batch and seq_len must be >= 1")
    cs = np.dtype(compute_dtype).itemsize
    if lora is None:
        master = _tree_bytes(config, mesh_sizes, 4)
        parameters, grads, opt = master, master, 2 * master
        compute_copy = 0 if cs == 4 else _tree_bytes(config, mesh_sizes, cs)
        trainable = sum(math.prod(s.shape) for s in jax.tree.leaves(param_specs(config),
                                                                   is_leaf=lambda x: isinstance(x, ParamSpec)))
    else:
        trainable = count_adapter_params(config, lora)
        adapter = 4 * trainable
        parameters, grads, opt, compute_copy = _tree_bytes(config, mesh_sizes, cs) + adapter, adapter, 2 * adapter, 0
    rows = -(-batch // max(1, mesh_sizes.get("data", 1) * mesh_sizes.get("fsdp", 1)))
    c, t = config, rows * seq_len
    x = t * c.d_model * cs
    attn_small = t * (2 * c.n_heads + 2 * c.n_kv_heads) * c.head_dim * cs
    scores = 2 * rows * c.n_heads * seq_len * seq_len * 4
    moe = t * c.top_k * (c.d_model + 3 * c.d_ff) * cs
    per_layer = {"none": 3 * x + attn_small + scores + moe, "dots": x + attn_small + moe}
    if remat == "layer":
        activations = c.n_layers * x + per_layer["none"]
    else:
        activations = c.n_layers * per_layer[remat]
    activations += 2 * t * c.vocab_size * 4
    total = parameters + compute_copy + grads + opt + activations
    return {"parameters": parameters, "compute_copy": compute_copy, "gradients": grads, "optimizer_state": opt,
            "activations": activations, "total": total, "trainable_params": trainable}
