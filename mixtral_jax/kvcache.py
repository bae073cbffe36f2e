"""The KV cache: its layout, writes at per-row positions, and the int8 variant.

    {"lengths": [B] int32,
     "layers_{i}": {"k": [B, S, K, H], "v": [B, S, K, H]}}              float caches
     "layers_{i}": {"k", "v": [B, S, K, H] int8,
                    "k_scale", "v_scale": [B, S, K] float32}          int8 caches

Slot s of a row holds the token at position s. An int8 cache stores each key and value vector
(one token, one KV head: H numbers) as symmetric absmax int8 with one float32 scale,
x ≈ q · scale, scale = max|x| / 127: the payload is half a bfloat16 cache and a quarter of a
float32 one, plus 4 bytes of scale per token and head (3% at H = 128). Attention dequantises a
block at a time (mixtral_jax.attention), so no float copy of the whole cache is made.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .config import MixtralConfig

DTYPES = ("float32", "bfloat16", "float16", "int8")


class Quantized(NamedTuple):
    """int8 values [..., H] with one float32 scale per vector [...]."""
    values: jax.Array
    scale: jax.Array


def layer_name(i: int) -> str:
    return f"layers_{i}"


def is_int8(dtype) -> bool:
    return dtype is not None and np.dtype(dtype) == np.int8


def init_cache(config: MixtralConfig, batch: int, max_len: int, dtype=None) -> dict[str, Any]:
    """An empty fixed-size KV cache.

    Args:
      config: the model.
      batch: B rows.
      max_len: S slots per row; size it by prompt + new tokens, not by the context.
      dtype: "float32", "bfloat16", "float16", "int8" (quantized, see the module docstring) or a
        dtype; None for the platform default (float32 on CPU, bfloat16 on GPU/TPU).
    Returns:
      {"lengths": [B] int32 zeros, "layers_{i}": {"k", "v": [B, S, K, H] zeros (+ scales for int8)}}.
    """
    if not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if not isinstance(max_len, (int, np.integer)) or not 1 <= max_len <= config.max_seq_len:
        raise ValueError(f"max_len must be in [1, max_seq_len={config.max_seq_len}], got {max_len!r}")
    if dtype is None:
        dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}") from None
    if dt.name not in DTYPES:
        raise ValueError(f"cache dtype must be one of {', '.join(DTYPES)}, got {dt.name}")
    shape = (batch, max_len, config.n_kv_heads, config.head_dim)
    cache: dict[str, Any] = {"lengths": jnp.zeros((batch,), jnp.int32)}
    for i in range(config.n_layers):
        layer = {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}
        if is_int8(dt):
            layer |= {"k_scale": jnp.zeros(shape[:-1], jnp.float32), "v_scale": jnp.zeros(shape[:-1], jnp.float32)}
        cache[layer_name(i)] = layer
    return cache


def quantize(x: jax.Array) -> Quantized:
    """Symmetric absmax int8 per vector (last axis): [..., H] -> Quantized([..., H] int8, [...] float32)."""
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    values = jnp.clip(jnp.round(xf / safe[..., None]), -127, 127).astype(jnp.int8)
    return Quantized(values, scale)


def dequantize(x, dtype=jnp.float32) -> jax.Array:
    """A Quantized pair back to floats (arrays pass through, cast)."""
    if isinstance(x, Quantized):
        return (x.values.astype(jnp.float32) * x.scale[..., None]).astype(dtype)
    return x.astype(dtype)


def write(layer: dict[str, Any], k: jax.Array, v: jax.Array, write_pos: jax.Array, rows=None) -> dict[str, Any]:
    """The layer's cache with k, v [B, T, K, H] written at slots `write_pos` [B, T] (slot S: dropped)
    of cache rows `rows` [B] (None: row b for batch b)."""
    rows = (jnp.arange(k.shape[0]) if rows is None else rows)[:, None]
    if "k_scale" not in layer:
        return {name: layer[name].at[rows, write_pos].set(x.astype(layer[name].dtype), mode="drop")
                for name, x in (("k", k), ("v", v))}
    out = {}
    for name, x in (("k", k), ("v", v)):
        q = quantize(x)
        out[name] = layer[name].at[rows, write_pos].set(q.values, mode="drop")
        out[f"{name}_scale"] = layer[f"{name}_scale"].at[rows, write_pos].set(q.scale, mode="drop")
    return out


def read(layer: dict[str, Any]):
    """(k, v) of a layer's cache: arrays, or Quantized pairs for an int8 cache."""
    if "k_scale" not in layer:
        return layer["k"], layer["v"]
    return Quantized(layer["k"], layer["k_scale"]), Quantized(layer["v"], layer["v_scale"])
