"""int8 weight-only quantization with per-output-channel scales.

A quantized weight is a dict {"q": int8 [same shape], "scale": float32 [shape with the contracted
axes kept as 1]}, so `q * scale` broadcasts back without knowing which axes were contracted.
Expert and attention matrices are quantized; embeddings, norms and the router are not, and lm_head
is kept in bfloat16 (`HEAD_DTYPE`) whatever the float dtype the model loads in: the precision
Mixtral's checkpoints ship it in, so for them nothing is lost (bitsandbytes, GPTQ and AWQ also
leave it unquantized in 16 bits). On GPU/TPU that is the default dtype anyway; on CPU, where the
default is float32, it halves what a decode step reads for the vocabulary projection (40% of an
int8 step's bytes on the `small` config, ~1% for Mixtral 8x7B), and the CPU kernels read bfloat16
at memory speed. Rounding it to int8 as well, as llama.cpp's q8_0 does, was measured and not kept:
it cost the demo model greedy agreement with float32 (BENCHMARKS.md, "AVX2 machine").

The point is memory (Mixtral 8x7B in int8 is ~47 GB and fits one 80 GB GPU): weights are
dequantized where they are used, which XLA fuses into the matmul on GPU/TPU; on CPU the decode
kernels widen them in registers (mixtral_jax.kernels), and the pure-JAX path makes a float copy of
each weight read (see BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

# leaf -> axes contracted with the input (scales are per remaining "output channel")
CONTRACTED = {"wq": (0,), "wk": (0,), "wv": (0,), "wo": (0, 1), "w_gate": (-2,), "w_up": (-2,),
              "w_down": (-2,)}
MODES = (None, "int8")
HEAD_DTYPE = jnp.bfloat16  # lm_head's dtype in an int8 model (see the module docstring)


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
        elif not is_quantized(w):  # 2-D: the CPU layout's [out, in] attention matrix
            out[name] = quantize_int8(w, (-1,) if w.ndim == 2 else axes)
    return out


def quantize_globals(leaves: dict[str, Any]) -> dict[str, Any]:
    """Parameters with lm_head (if among them) in HEAD_DTYPE and the rest unchanged: the
    non-layer part of an int8 model."""
    out = dict(leaves)
    if "lm_head" in out:
        out["lm_head"] = out["lm_head"].astype(HEAD_DTYPE)
    return out


def quantize_params(params: dict[str, Any]) -> dict[str, Any]:
    """A parameter pytree as an int8 model: every layer through `quantize_layer`, the rest through
    `quantize_globals`."""
    return quantize_globals({k: quantize_layer(v) if k.startswith("layers_") else v for k, v in params.items()})


def take_expert(w, e):
    """Expert e of a stacked weight (plain or quantized) or of a split one."""
    if isinstance(w, (tuple, list)):
        return w[e]
    return jax.tree.map(lambda a: a[e], w)
