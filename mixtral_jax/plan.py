"""Per-device memory of a model on a mesh, without allocating anything.

Weights and the KV cache come from `jax.eval_shape` of `init_params` / `init_cache` and the same
logical-axis shardings the model runs with (mixtral_jax.sharding). Activations are the largest
transient buffers of one layer, counted from the einsum shapes of this implementation, for the
larger of a prefill of `prompt_len` tokens per row and a decode step:

- hidden states [B, T, D] x 4 (residual, normed, attention out, MoE out), q [B, T, N, H],
  k/v [B, T, K, H], attention scores and probabilities [B, N, T, S] float32 x 2;
- MoE einsum dispatch/combine masks [g, t, E, C] float32 x 2 (dropless: C = t = routing group),
  expert inputs/outputs [g, E, C, D] x 2 and gate/up [g, E, C, F] x 2;
- logits [B, V] float32 at the last position.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from .config import MixtralConfig
from .model import ParamSpec, init_cache, init_params, param_specs
from .moe import DEFAULT_GROUP_SIZE
from .quant import CONTRACTED
from .sharding import shard_shape

GROUPS = {"embed": "embeddings", "lm_head": "embeddings", "wq": "attention", "wk": "attention",
          "wv": "attention", "wo": "attention", "w_gate": "experts", "w_up": "experts", "w_down": "experts",
          "router": "norms_router", "attn_norm": "norms_router", "ffn_norm": "norms_router",
          "final_norm": "norms_router"}
KV_AXES = ("batch", "cache_sequence", "kv_heads", "head_dim")


def _bytes(shape, axes, mesh_sizes, itemsize) -> int:
    return math.prod(shard_shape(shape, axes, mesh_sizes)) * itemsize


def plan_memory(config: MixtralConfig, mesh_sizes: dict[str, int], *, dtype="bfloat16", batch: int = 1,
                max_seq_len: int | None = None, prompt_len: int = 512,
                quantize: str | None = None) -> dict[str, Any]:
    """Per-device bytes of weights (by group), KV cache and activations.

    Args:
      config: the model.
      mesh_sizes: {"data": d, "expert": e, "tensor": t}.
      dtype: weight, cache and activation dtype.
      batch: rows decoded together.
      max_seq_len: KV cache length per row (default: the model's context).
      prompt_len: prefill length per row for the activation estimate.
      quantize: "int8" for int8 expert and attention matrices (1 byte each plus a float32 scale
        per output channel, as mixtral_jax.quant stores them).
    Returns:
      {"weights": {group: bytes}, "weights_total", "kv_cache", "activations", "total"}, per device.
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
        else:
            n_bytes = _bytes(shaped.shape, spec.axes, mesh_sizes, itemsize)
        weights[GROUPS[leaf]] += n_bytes

    jax.tree_util.tree_map_with_path(add, specs, shapes, is_leaf=lambda x: isinstance(x, ParamSpec))
    cache = jax.eval_shape(lambda: init_cache(config, batch, seq, dtype=dtype))
    kv = sum(_bytes(a.shape, KV_AXES, mesh_sizes, itemsize)
             for name, layer in cache.items() if name.startswith("layers_") for a in layer.values())
    activations = max(_activation_bytes(config, mesh_sizes, itemsize, batch, t, s)
                      for t, s in ((min(prompt_len, seq), min(prompt_len, seq)), (1, seq)))
    total_weights = sum(weights.values())
    return {"weights": weights, "weights_total": total_weights, "kv_cache": kv, "activations": activations,
            "total": total_weights + kv + activations}


def _activation_bytes(c: MixtralConfig, mesh, itemsize: int, b: int, t: int, s: int) -> int:
    tokens = b * t
    group = min(DEFAULT_GROUP_SIZE, tokens)
    g = -(-tokens // group)
    f32 = 4
    act = ("batch", "sequence", "embed")
    parts = [
        4 * _bytes((b, t, c.d_model), act, mesh, itemsize),
        _bytes((b, t, c.n_heads, c.head_dim), ("batch", "sequence", "q_heads", "head_dim"), mesh, itemsize),
        2 * _bytes((b, t, c.n_kv_heads, c.head_dim), ("batch", "sequence", "kv_heads", "head_dim"), mesh, itemsize),
        2 * _bytes((b, c.n_heads, t, s), ("batch", "q_heads", "sequence", "cache_sequence"), mesh, f32),
        2 * _bytes((g, group, c.n_experts, group), ("token_groups", None, "experts_replicated", "capacity"),
                   mesh, f32),
        2 * _bytes((g, c.n_experts, group, c.d_model), ("groups", "experts", "capacity", "embed"), mesh, itemsize),
        2 * _bytes((g, c.n_experts, group, c.d_ff), ("groups", "experts", "capacity", "ffw"), mesh, itemsize),
        _bytes((b, c.vocab_size), ("batch", "vocab"), mesh, f32),
    ]
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
