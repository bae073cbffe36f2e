"""Optional CPU decode kernels: the matrix products of a few-token step as XLA FFI custom calls.

Decode reads every weight once per step for a handful of activation rows, so it runs at the speed
of memory. XLA:CPU's dots reach that for float32 weights only; with bfloat16 or int8 weights they
run at a small fraction of it (DESIGN.md §2), so on CPU the model's fewer bytes bought nothing. The
C++ kernels in `cpu_kernels.cc` (built at install time against jaxlib's XLA FFI headers) widen
bf16/int8 weights to float32 in registers, prefetch weight rows ahead and spread output rows over a
few spinning worker threads (one per core beyond the caller). One exception to exact float32
products: on AVX2 (`isa()` "avx2"), a single activation row against int8 [out, in] rows (the MoE
layer and the CPU layout's attention projections at batch-1 decode) is rounded to int16 in blocks
of 64 values, each within 2^-16 of its block's largest (256 times finer than the weights' int8
rounding), and multiplied in integers (`vpmaddwd`), as llama.cpp multiplies q8_0 weights by
activations rounded to int8; that made the
MoE layers 1.14x and batch-1 int8 decode 1.15x faster there (BENCHMARKS.md, "AVX2 machine"). The
kernels are:

  - `linear`: x [M, K] @ w [K, N] (lm_head, canonical attention projections) or @ w[N, K]^T (the
    CPU layout's attention projections, `mixtral_jax.model.split_layer`), float32/bfloat16/int8
    weights (int8: per-output-channel scales, as `mixtral_jax.quant` stores them);
  - `moe`: the whole MoE layer over the CPU layout's per-expert [out, in] matrices, reading only
    the selected experts (one call per layer instead of the `sorted` strategy's per-expert
    loops): for decode's few tokens a loop bound by memory; for a prompt chunk (up to
    `MOE_MAX_ROWS` tokens, AVX-512 or AVX2) register-blocked panels bound by arithmetic;
  - `attend`: decode attention (one query per row) over a float32 or bfloat16 KV cache in its own
    [rows, slots, K, H] layout, reading each row's visible slots once (`attention_fits`).

They run when all of these hold at trace time: the backend is CPU, no mesh, at most `MAX_ROWS`
activation rows (`moe_max_rows()` for `moe`: 512 with AVX-512 or AVX2; one query per row for
`attend`), every dimension a multiple of 16, weights float32/bfloat16/int8 (`attend`: float32 or
bfloat16 queries and cache), the library built, and `MIXTRAL_JAX_CPU_KERNELS` is not "0".
Otherwise the pure-JAX path runs; it is also the oracle (tests/test_kernels.py) and the backward
pass (gradients are the pure path's `jax.vjp`), so the choice never changes what a program computes
beyond summation order (and, in that one int8 case, the activation's int16 rounding). `status()`
says which path runs; it is logged once when a model first traces on CPU. The choice is made while
tracing, so it adds no compiled programs."""

from __future__ import annotations

import ctypes
import functools
import glob
import logging
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ..quant import dequantize, is_quantized

logger = logging.getLogger(__name__)

ENV = "MIXTRAL_JAX_CPU_KERNELS"
MAX_ROWS = 16          # activation rows per call (cpu_kernels.cc kMaxRows)
# Tokens up to which the MoE layer runs on the kernel: above kMaxRows, register-blocked panels that
# pad each expert's rows to 16 where XLA's `sorted` steps pad to 32 (small config, one layer,
# benchmarks/moe_layer.py; AVX-512: 1.42x `sorted` at 151 tokens, 1.28x at 264, even at 520; AVX2
# with its own 6x16 blocks: 1.3-1.7x at 40-151 tokens, 1.2x at 264, even at 384; since each task's
# rows stay in L2 across its panels and SwiGLU is vectorized, 1.07x at 512, so a 512-token prompt
# takes it too). The generic build has no register blocking worth the name, so there the MoE kernel
# keeps to MAX_ROWS (`moe_max_rows`).
MOE_MAX_ROWS = 512
# (name, description) by `mj_isa()`
_ISAS = (("generic", "generic x86-64/portable C++"), ("avx2", "AVX2+FMA"), ("avx512", "AVX-512"))
_TARGETS = ("mj_linear", "mj_moe", "mj_attend", "mj_read_probe")
_WEIGHT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.int8)


@functools.cache
def _load() -> tuple[Any, str]:
    """(the loaded library or None, a description); registers the FFI targets once."""
    found = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "_cpu_kernels*.so")))
    if not found:
        return None, "not built (install with a C++17 compiler to build them)"
    try:
        lib = ctypes.cdll.LoadLibrary(found[0])
        for name in _TARGETS:
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    except (OSError, AttributeError) as error:
        return None, f"failed to load {found[0]}: {error}"
    return lib, f"built, {_ISAS[lib.mj_isa()][1]}"


def status() -> str:
    """One line: which path the CPU decode matrix products take, and why."""
    if os.environ.get(ENV) == "0":
        return f"CPU kernels off ({ENV}=0): pure-JAX path"
    lib, why = _load()
    return f"CPU kernels on ({why})" if lib is not None else f"CPU kernels off ({why}): pure-JAX path"


def isa() -> str | None:
    """The instruction set the built kernels run with here: "avx512", "avx2", "generic", or None
    when they are not built (whether they run at all: `status()`, `enabled()`)."""
    lib = _load()[0]
    return None if lib is None else _ISAS[lib.mj_isa()][0]


@functools.cache
def _announce(line: str) -> None:
    # A build that failed is worth a warning (decode runs slower than it could); a choice is not.
    unexpected = line.startswith("CPU kernels off") and f"{ENV}=0" not in line
    logger.log(logging.WARNING if unexpected else logging.INFO, line)


def enabled(mesh=None) -> bool:
    """Whether the kernels may run in a program traced now (CPU, no mesh, built, not turned off)."""
    if mesh is not None or jax.default_backend() != "cpu":
        return False
    _announce(status())
    return os.environ.get(ENV) != "0" and _load()[0] is not None


def _weight_ok(w) -> bool:
    leaf = w["q"] if is_quantized(w) else w
    return leaf.ndim == 2 and leaf.dtype in _WEIGHT_DTYPES and all(n % 16 == 0 for n in leaf.shape)


def moe_max_rows() -> int:
    """Tokens up to which the MoE layer may take the kernel on this processor (see MOE_MAX_ROWS)."""
    return MOE_MAX_ROWS if isa() in ("avx2", "avx512") else MAX_ROWS


def fits(rows: int, *weights, mesh=None, max_rows: int = MAX_ROWS) -> bool:
    """Whether `rows` activation rows times these 2-D weights (plain or int8) take the kernels
    (`max_rows`: `moe_max_rows()` for the MoE layer)."""
    return 0 < rows <= max_rows and all(_weight_ok(w) for w in weights) and enabled(mesh)


def attention_fits(q, k, mesh=None) -> bool:
    """Whether decode attention of queries q [B, 1, N, H] over cache k [R, S, K, H] takes the
    kernel: one query per row, float32 or bfloat16 queries and cache (an int8 cache keeps the pure
    path), H a multiple of 16."""
    floats = (jnp.float32, jnp.bfloat16)
    return (q.ndim == 4 and q.shape[1] == 1 and q.dtype in floats and isinstance(k, jax.Array)
            and k.dtype in floats and q.shape[-1] % 16 == 0 and enabled(mesh))


def flatten(w, n_in: int):
    """A weight [*in, *out] (plain or int8) as 2-D [prod(in), prod(out)]; int8 scales as [prod(out)]."""
    def two_d(a):
        return a.reshape(math.prod(a.shape[:n_in]), -1)
    if is_quantized(w):
        return {"q": two_d(w["q"]), "scale": w["scale"].reshape(-1)}
    return two_d(w)


def _with_pure_grad(kernel: Callable, pure: Callable) -> Callable:
    """`kernel` forward, the pure-JAX function's gradient (custom calls have no autodiff rule)."""
    fn = jax.custom_vjp(kernel)
    fn.defvjp(lambda *args: (kernel(*args), args), lambda args, g: jax.vjp(pure, *args)[1](g))
    return fn


def _split_weight(w):
    """(data, float32 scale [N] or a placeholder) for the custom call."""
    if is_quantized(w):
        return w["q"], w["scale"].reshape(-1).astype(jnp.float32)
    return w, jnp.zeros((1,), jnp.float32)


def _require_library() -> None:
    """Load the library (registering its targets) or say why it cannot run."""
    lib, why = _load()
    if lib is None:
        raise RuntimeError(f"mixtral_jax CPU kernels unavailable: {why}")


def _linear_kernel(x, w, *, nk: bool):
    _require_library()
    data, scale = _split_weight(w)
    n = data.shape[0] if nk else data.shape[1]
    call = jax.ffi.ffi_call("mj_linear", jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32),
                            vmap_method="sequential")
    return call(x.astype(jnp.float32), data, scale, nk=nk).astype(x.dtype)


def _linear_pure(x, w, *, nk: bool):
    w = dequantize(w, x.dtype)
    return jnp.einsum("mk,nk->mn" if nk else "mk,kn->mn", x, w)                       # [M, N]


def linear(x: jax.Array, w, *, nk: bool = False) -> jax.Array:
    """x [M, K] @ w [K, N] (or w [N, K] with nk=True) -> [M, N] in x's dtype, on the kernel when
    `fits` (the caller checks; `flatten` makes N-d weights 2-D)."""
    fn = _with_pure_grad(functools.partial(_linear_kernel, nk=nk), functools.partial(_linear_pure, nk=nk))
    return fn(x, w)


def _moe_kernel(x, experts, gates, weights):
    _require_library()
    n_experts = len(weights[0])
    operands = [_split_weight(w)[0] for group in weights for w in group]
    if is_quantized(weights[0][0]):
        operands += [_split_weight(w)[1] for group in weights for w in group]
    call = jax.ffi.ffi_call("mj_moe", jax.ShapeDtypeStruct(x.shape, jnp.float32), vmap_method="sequential")
    return call(x.astype(jnp.float32), experts, gates.astype(jnp.float32), *operands,
                n_experts=n_experts).astype(x.dtype)


def moe(x: jax.Array, experts: jax.Array, gates: jax.Array, weights, pure: Callable) -> jax.Array:
    """The MoE layer on the kernel for a few tokens.

    Args:
      x: [T, D]; experts: [T, X] int32, -1 for assignments to skip (padding); gates: [T, X].
      weights: (w_gate, w_up, w_down), each a tuple of E per-expert [out, in] matrices (plain or int8).
      pure: the same layer in pure JAX with this signature (its gradient is used).
    Returns:
      y [T, D] in x's dtype.
    """
    return _with_pure_grad(_moe_kernel, pure)(x, experts, gates, weights)


def _attend_kernel(q, k, v, rows, q_pos, kv_len, *, window: int):
    _require_library()
    call = jax.ffi.ffi_call("mj_attend", jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")
    return call(q.astype(jnp.float32), k, v, rows, q_pos, kv_len, window=window).astype(q.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, rows: jax.Array, q_pos: jax.Array, kv_len: jax.Array,
           window: int | None, pure: Callable) -> jax.Array:
    """Decode attention on the kernel (see `attention_fits`).

    Args:
      q: [B, N, H] float32 or bfloat16, one query per row; k, v: [R, S, K, H] cache, both float32
        or both bfloat16 (widened in registers: a bfloat16 model's default cache).
      rows: [B] int32 the cache row of each query (out of range: sees nothing); q_pos, kv_len: [B]
        int32 (query b sees slot s when s <= q_pos[b], s < kv_len[b], and q_pos[b] - s < window).
      window: the sliding window, or None.
      pure: the same in pure JAX with this signature (its gradient is used).
    Returns:
      [B, N, H] in q's dtype; a row that sees nothing gets zeros.
    """
    kernel = functools.partial(_attend_kernel, window=int(window or 0))
    ints = [a.astype(jnp.int32) for a in (rows, q_pos, kv_len)]
    return _with_pure_grad(kernel, pure)(q, k, v, *ints)


def read_probe(x: jax.Array) -> jax.Array:
    """Sum of a float32 array by the kernels' multi-threaded streaming read (the bandwidth probe)."""
    _require_library()
    call = jax.ffi.ffi_call("mj_read_probe", jax.ShapeDtypeStruct((1,), jnp.float32))
    return call(x.reshape(-1))[0]
