"""int8 weight-only quantization with per-output-channel scales.

A quantized weight is a dict {"q": int8 [same shape], "scale": float32 [shape with the contracted
axes kept as 1]}, so `q * scale` broadcasts back without knowing which axes were contracted.
Expert and attention matrices are quantized; embeddings, lm_head, norms and the router are not.
The point is memory (Mixtral 8x7B in int8 is ~47 GB and fits one 80 GB GPU): weights are
dequantized where they are used, which XLA fuses into the matmul on GPU/TPU; on CPU it costs
a float copy of each weight read (see BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

# leaf -> axes contracted with the input (scales are per remaining "output channel")
CONTRACTED = {"wq": (0,), "wk": (0,), "wv": (0,), "wo": (0, 1), "w_gate": (-2,), "w_up": (-2,),
              "w_down": (-2,)}
MODES = (None, "int8")


def is_quantized(w) -> bool:
    return isinstance(w, dict) and "q" in w


def quantize_int8(w: jax.Array, axes: tuple[int, ...]) -> dict[str, jax.Array]:
    """Symmetric int8 with one float32 scale per output channel (max |w| over `axes` / 127)."""
    wf = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(wf), axis=axes, keepdims=True) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)
    return {"q": jnp.clip(jnp.round(wf / scale), -127, 127).astype(jnp.int8), "scale": scale}


def dequantize(w, dtype=None):
    """A usable weight: plain arrays pass through; int8 dicts become `q * scale` in `dtype`."""
    if not is_quantized(w):
        return w
    dtype = dtype or jnp.float32
    return w["q"].astype(dtype) * w["scale"].astype(dtype)


def quantize_layer(layer: dict[str, Any]) -> dict[str, Any]:
    """A layer with its attention and expert matrices (stacked or split) in int8."""
    out = dict(layer)
    for name, axes in CONTRACTED.items():
        w = layer[name]
        if isinstance(w, (tuple, list)):  # split experts: each [out, in]
            out[name] = tuple(we if is_quantized(we) else quantize_int8(we, (-1,)) for we in w)
        elif not is_quantized(w):
            out[name] = quantize_int8(w, axes)
    return out


def quantize_params(params: dict[str, Any]) -> dict[str, Any]:
    """Every layer of a parameter pytree quantized (see `quantize_layer`)."""
    return {k: quantize_layer(v) if k.startswith("layers_") else v for k, v in params.items()}


def take_expert(w, e):
    """Expert e of a stacked weight (plain or quantized) or of a split one."""
    if isinstance(w, (tuple, list)):
        return w[e]
    return jax.tree.map(lambda a: a[e], w)
