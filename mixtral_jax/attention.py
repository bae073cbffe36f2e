"""Attention over a KV cache: the materialised oracle, blockwise (online-softmax) attention, and the
per-platform choice between them.

Mask semantics, shared by every path: key slot s of row b holds position s; query i of row b (at
position `q_pos[b, i]`) sees slot s when s <= q_pos[b, i], s < kv_len[b], and, with a sliding
window W, q_pos[b, i] - s < W. Masked scores are a finite -1e30 rather than -inf, so a query that
sees nothing (a padding row) gets a finite average instead of NaN.

Blockwise attention (flash-style, in pure JAX) never holds more than one [block_q, block_k] tile
of scores per head: for each query block it loops over key blocks keeping a float32 running max `m`,
sum `l` and accumulator `acc`, and divides at the end. Its memory is linear in the sequence length.
With `skip=True` a query block visits only the key blocks some of its queries can see (up to its
last position and the longest row, from its first position minus the window), so causal prefill
costs about half the square and decode costs what the filled part of the cache holds. The key
blocks are visited by a fixed-length scan whose invisible steps a `cond` skips (the bounds are
data, the trip count is not), so `grad` goes through it; measured as fast as a `while_loop` over
the visible blocks. A cache of one key block skips the scan and the cond. Decode (one query per
row) over a float32 or bfloat16 cache runs on the CPU kernel instead where it may
(`decode_kernel`): each block's slicing and transposing for XLA's batched dots cost several times
the block's read.

Einsum alphabet (DESIGN.md): B batch, T query length, S key length, K kv heads, G = N/K query heads
per kv head, H head_dim; q a query block's rows, s a key block's slots.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import kernels
from .kvcache import Quantized, dequantize
from .layers import attention_mask, grouped_attention

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "materialized", "blockwise", "cudnn", "splash")
MASKED = -1e30
# Measured on this CPU (small config's heads, N=16 K=4 H=64): 128- and 256-row tiles tie within
# noise from decode over 512 slots to a 4096-token prefill; 512 is up to 2x slower below 1024 tokens.
DEFAULT_BLOCK = 256


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, kv_len: jax.Array, *,
                        sliding_window: int | None = None, block_q: int = DEFAULT_BLOCK,
                        block_k: int = DEFAULT_BLOCK, skip: bool = True, rows=None) -> jax.Array:
    """Online-softmax attention over key blocks, GQA without repeating K/V.

    Args:
      q: [B, T, N, H] queries (RoPE applied).
      k, v: [B, S, K, H] keys (RoPE applied) and values; slot s holds position s. Either may be a
        `kvcache.Quantized` int8 pair: each block is dequantised as it is read.
      q_pos: [B, T] int query positions.
      kv_len: [B] int filled slots per row (slots at or past it are hidden).
      sliding_window: hide keys this many positions back or further; None for no window.
      block_q, block_k: tile sizes (clipped to T and S).
      skip: compute only the key blocks a query block can see (False: all of them; the same result).
      rows: [B] int the rows of k and v that the queries' rows read (k and v then hold more rows:
        a server's cache of every slot); None: row b. Only the visible blocks of those rows are
        read, never a whole row.
    Returns:
      [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    s, kv_heads = _values(k).shape[1], _values(k).shape[2]
    g = n // kv_heads
    bq, bk = min(block_q, t), min(block_k, s)
    nq, nk = -(-t // bq), -(-s // bk)
    q_pos = q_pos.astype(jnp.int32)
    kv_len = kv_len.astype(jnp.int32)
    if nq * bq != t:  # padded queries repeat the last position: they widen no block's bounds
        q = jnp.pad(q, ((0, 0), (0, nq * bq - t), (0, 0), (0, 0)))
        q_pos = jnp.pad(q_pos, ((0, 0), (0, nq * bq - t)), mode="edge")
    if nk * bk != s:  # padded slots lie past every row's kv_len
        k, v = (jax.tree.map(lambda a: jnp.pad(a, [(0, 0), (0, nk * bk - s)] + [(0, 0)] * (a.ndim - 2)), x)
                for x in (k, v))
    qb = q.reshape(b, nq, bq, kv_heads, g, h).transpose(1, 0, 3, 4, 2, 5)            # [nq, B, K, G, q, H]
    pb = q_pos.reshape(b, nq, bq).transpose(1, 0, 2)                                 # [nq, B, q]
    scale = h ** -0.5
    longest = jnp.max(kv_len)

    def key_blocks(pos):
        """The [lo, hi) key blocks a query block at positions `pos` [B, q] can see."""
        last = jnp.minimum(jnp.max(pos) + 1, longest)                              # exclusive slot
        hi = jnp.clip((last + bk - 1) // bk, 1, nk)
        lo = 0 if sliding_window is None else jnp.clip((jnp.min(pos) - sliding_window + 1) // bk, 0, hi - 1)
        return lo, hi

    def one_query_block(args):
        qi, pos = args                                                               # [B,K,G,q,H], [B,q]

        def step(j, carry):
            m, l, acc = carry
            # Blocks are sliced from the cache's own [B, S, K, H] layout and only they are made
            # heads-major: a decode step then reads the filled part of the cache, not all of it.
            kj, vj = (_block(x, j * bk, bk, q.dtype, rows).transpose(0, 2, 1, 3) for x in (k, v))  # [B, K, s, H]
            scores = jnp.einsum("bkgqh,bksh->bkgqs", qi, kj,
                                preferred_element_type=jnp.float32) * scale          # [B, K, G, q, s]
            slot = j * bk + jnp.arange(bk, dtype=jnp.int32)
            visible = (slot[None, None, :] <= pos[:, :, None]) & (slot[None, None, :] < kv_len[:, None, None])
            if sliding_window is not None:
                visible &= pos[:, :, None] - slot[None, None, :] < sliding_window  # [B, q, s]
            scores = jnp.where(visible[:, None, None], scores, MASKED)
            m_new = jnp.maximum(m, jnp.max(scores, axis=-1))                          # [B, K, G, q]
            p = jnp.exp(scores - m_new[..., None])
            c = jnp.exp(m - m_new)
            acc = acc * c[..., None] + jnp.einsum("bkgqs,bksh->bkgqh", p.astype(vj.dtype), vj,
                                                  preferred_element_type=jnp.float32)  # [B, K, G, q, H]
            return m_new, l * c + jnp.sum(p, axis=-1), acc

        init = (jnp.full(qi.shape[:-1], MASKED, jnp.float32), jnp.zeros(qi.shape[:-1], jnp.float32),
                jnp.zeros(qi.shape, jnp.float32))
        if skip and nk == 1:
            # One key block (decode over a short cache) is always visited (hi >= 1). A cond around
            # it cost ~80 us a layer on CPU: batch-1 decode of `small` ran 6% (int8) and 10%
            # (float32) faster without it (BENCHMARKS.md, "Zen 5").
            _, l, acc = step(0, init)
        elif skip:
            lo, hi = key_blocks(pos)
            # Every key block in a fixed-length scan, the invisible ones skipped by a cond: the
            # bounds are data, the trip count is not, so `grad` goes through it.
            visit = lambda c, j: (jax.lax.cond((j >= lo) & (j < hi), step, lambda _, c: c, j, c), None)  # noqa: E731
            (_, l, acc), _ = jax.lax.scan(visit, init, jnp.arange(nk))
        else:
            _, l, acc = jax.lax.fori_loop(0, nk, step, init)
        return (acc / jnp.maximum(l, 1e-30)[..., None]).astype(q.dtype)

    # A sequential map, not vmap: under vmap the per-block loop bounds would become the largest.
    out = jax.lax.map(one_query_block, (qb, pb))                                     # [nq, B, K, G, q, H]
    return out.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, n, h)[:, :t]


def _values(x):
    return x.values if isinstance(x, Quantized) else x


def _block(x, start, size: int, dtype, rows=None) -> jax.Array:
    """Slots [start, start + size) of a [B, S, K, H] cache (a Quantized one dequantised) as `dtype`,
    of its rows `rows` (None: all)."""
    part = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=1), x)
    if rows is not None:
        part = jax.tree.map(lambda a: jnp.take(a, rows, axis=0), part)
    return dequantize(part, dtype) if isinstance(x, Quantized) else part


def materialized_attention(q, k, v, q_pos, kv_len, *, sliding_window=None) -> jax.Array:
    """The oracle: scores [B, K, G, T, S] materialised, same mask semantics. Shapes as `blockwise_attention`."""
    k, v = (dequantize(x, q.dtype) if isinstance(x, Quantized) else x for x in (k, v))
    slots = jnp.arange(k.shape[1], dtype=jnp.int32)
    mask = attention_mask(q_pos, slots, slots[None, :] < kv_len[:, None], sliding_window)   # [B, T, S]
    return grouped_attention(q, k, v, mask)


class Chunk(NamedTuple):
    """The new tokens' own keys and values, for the kernel paths, which attend to them (causally)
    and to the cache before them in two calls merged by their log-sum-exp."""
    k: jax.Array               # [B, T, K, H]
    v: jax.Array               # [B, T, K, H]
    new_len: jax.Array         # [B] valid new tokens per row
    offset: jax.Array | None   # [B] filled cache slots before them; None without a cache


def check_name(name: str) -> None:
    """ValueError for an unknown implementation name."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention {name!r}; choose from {', '.join(IMPLEMENTATIONS)}")


def kernel_unfit(name: str, q, k, chunk: Chunk, sliding_window, platform: str) -> str | None:
    """Why kernel `name` ("cudnn" or "splash") cannot run these shapes here, or None when it can."""
    wanted = {"cudnn": "gpu", "splash": "tpu"}[name]
    if platform != wanted:
        return f"{name} attention runs on {wanted.upper()}, not {platform}"
    if isinstance(k, Quantized):
        return f"{name} attention takes a float KV cache, not int8"
    if chunk.offset is not None and sliding_window is not None:
        return f"{name} attention after a cache does not take a sliding window"
    if name == "cudnn":
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            return f"cudnn attention needs bfloat16 or float16, not {q.dtype}"
        if q.shape[-1] % 8 or q.shape[-1] > 128:
            return f"cudnn attention needs a head_dim that is a multiple of 8 and at most 128, not {q.shape[-1]}"
    elif q.shape[1] % SPLASH_BLOCK or k.shape[1] % SPLASH_BLOCK:
        return f"splash attention needs query and key lengths that are multiples of {SPLASH_BLOCK}"
    return None


def choose(name: str, q, k, chunk: Chunk, sliding_window=None, platform: str | None = None) -> str:
    """The implementation to run (at trace time, from shapes and dtypes).

    "auto": cudnn on GPU and splash on TPU when their constraints hold (`kernel_unfit`), else
    blockwise, which on CPU matched or beat the materialised form at every size measured, decode
    included, with linear memory. An explicit "cudnn" or "splash" that cannot run is a ValueError
    saying why.
    """
    check_name(name)
    platform = platform or jax.default_backend()
    if name in ("cudnn", "splash"):
        reason = kernel_unfit(name, q, k, chunk, sliding_window, platform)
        if reason:
            raise ValueError(reason)
        return name
    if name != "auto":
        return name
    kernel = {"gpu": "cudnn", "tpu": "splash"}.get(platform)
    chosen = kernel if kernel and not kernel_unfit(kernel, q, k, chunk, sliding_window, platform) else "blockwise"
    log.debug("attention auto -> %s on %s for q %s, k %s", chosen, platform, q.shape, _values(k).shape)
    return chosen


def attend(name: str, q, k, v, q_pos, kv_len, chunk: Chunk, *, sliding_window=None, rows=None,
           mesh=None) -> jax.Array:
    """Attention by implementation `name` (or "auto"); shapes as `blockwise_attention`, `chunk` the new
    tokens' own keys and values (k, v being the cache they were written to, or themselves; `rows`
    the cache rows the queries read, as `blockwise_attention`'s). Blockwise decode (one query per
    row) over a float32 or bfloat16 cache runs on the CPU kernel where it may
    (`kernels.attention_fits`)."""
    name = choose(name, q, k, chunk, sliding_window)
    if name == "blockwise":
        if kernels.attention_fits(q, k, mesh):
            return decode_kernel(q, k, v, q_pos, kv_len, sliding_window=sliding_window, rows=rows)
        return blockwise_attention(q, k, v, q_pos, kv_len, sliding_window=sliding_window, rows=rows)
    if rows is not None:  # the other paths take the rows themselves (a copy of each)
        k, v = (jax.tree.map(lambda a: jnp.take(a, rows, axis=0), x) for x in (k, v))
    if name == "materialized":
        return materialized_attention(q, k, v, q_pos, kv_len, sliding_window=sliding_window)
    past = None if chunk.offset is None else (k, v, chunk.offset)
    if name == "cudnn":
        return sdpa_attention(q, chunk, past, sliding_window=sliding_window)
    return splash_attention(q, chunk, past, sliding_window=sliding_window)


def decode_kernel(q, k, v, q_pos, kv_len, *, sliding_window=None, rows=None) -> jax.Array:
    """`blockwise_attention` for one query per row on the CPU kernel (`kernels.attend`): the
    visible slots of each row read once in the cache's own [B, S, K, H] layout, where the blockwise
    loop transposes each key and value block for XLA's batched dots (~0.45 ms a 256-slot block of
    8 rows, several times the block's read). Shapes as `blockwise_attention` with T = 1."""
    b = q.shape[0]
    rows = jnp.arange(b, dtype=jnp.int32) if rows is None else rows

    def pure(q1, k, v, rows, q_pos1, kv_len):
        return blockwise_attention(q1[:, None], k, v, q_pos1[:, None], kv_len, sliding_window=sliding_window,
                                   rows=rows)[:, 0]
    return kernels.attend(q[:, 0], k, v, rows, q_pos[:, 0], kv_len, sliding_window, pure)[:, None]


def _merge(own, lse_own, prev, lse_prev, offset):
    """Two attention outputs [B, T, N, H] over disjoint keys, by their log-sum-exps [B, T, N]."""
    lse = jnp.logaddexp(lse_own, lse_prev)
    out = (own.astype(jnp.float32) * jnp.exp(lse_own - lse)[..., None]
           + prev.astype(jnp.float32) * jnp.exp(lse_prev - lse)[..., None])
    # A row with nothing cached keeps its own part as it is (a kernel's empty-key output is not
    # guaranteed to be finite).
    return jnp.where(offset[:, None, None, None] > 0, out, own.astype(jnp.float32)).astype(own.dtype)


def sdpa_attention(q, chunk: Chunk, past=None, *, sliding_window=None, implementation="cudnn") -> jax.Array:
    """`jax.nn.dot_product_attention` (cuDNN on GPU): the chunk against itself, causally, and after a
    cache against the cache's first `offset` slots, merged. Never a dense mask or bias: those
    become a B·N·T·S tensor. `implementation="xla"` runs the same calls anywhere (the tests' CPU
    check of this path).

    Args:
      q: [B, T, N, H]; chunk: its own keys/values and lengths; past: (cache k, cache v, offset) or None.
    Returns:
      [B, T, N, H] in q's dtype.
    """
    window = None if sliding_window is None else (sliding_window - 1, 0)
    own, lse_own = jax.nn.dot_product_attention(
        q, chunk.k, chunk.v, is_causal=True, query_seq_lengths=chunk.new_len, key_value_seq_lengths=chunk.new_len,
        local_window_size=window, implementation=implementation, return_residual=True)
    if past is None:
        return own
    k, v, offset = past
    prev, lse_prev = jax.nn.dot_product_attention(
        q, k, v, query_seq_lengths=chunk.new_len, key_value_seq_lengths=offset, implementation=implementation,
        return_residual=True)
    return _merge(own, lse_own, prev, lse_prev, offset)


SPLASH_BLOCK = 128


def splash_attention(q, chunk: Chunk, past=None, *, sliding_window=None, interpret: bool = False) -> jax.Array:
    """Pallas splash attention (TPU; `interpret=True` runs it anywhere, slowly): causal (or local)
    over the chunk itself, full over the cache's first `offset` slots, merged; GQA native, padding
    and offsets by segment ids, vmapped over the batch. Shapes as `sdpa_attention`; lengths must be
    multiples of SPLASH_BLOCK."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, n, h = q.shape
    blocks = sk.BlockSizes(*(SPLASH_BLOCK,) * 8)
    qn = (q * h ** -0.5).transpose(0, 2, 1, 3)                                        # [B, N, T, H]

    def run(mask, k, v, kv_valid):
        kernel = sk.make_splash_mha(sm.MultiHeadMask([mask] * n), block_sizes=blocks, head_shards=1,
                                    q_seq_shards=1, save_residuals=True, interpret=interpret)
        segments = jax.vmap(lambda valid: sk.SegmentIds(q=jnp.zeros((t,), jnp.int32),
                                                        kv=jnp.where(valid, 0, 1).astype(jnp.int32)))(kv_valid)
        out, (lse,) = jax.vmap(kernel)(qn, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), segment_ids=segments)
        return out.transpose(0, 2, 1, 3), lse.transpose(0, 2, 1)                      # [B,T,N,H], [B,T,N]

    own_mask = (sm.CausalMask((t, t)) if sliding_window is None
                else sm.LocalMask((t, t), window_size=(sliding_window - 1, 0), offset=0))
    own, lse_own = run(own_mask, chunk.k, chunk.v, jnp.arange(t)[None, :] < chunk.new_len[:, None])
    if past is None:
        return own.astype(q.dtype)
    k, v, offset = past
    s = k.shape[1]
    prev, lse_prev = run(sm.FullMask((t, s)), k, v, jnp.arange(s)[None, :] < offset[:, None])
    return _merge(own, lse_own, prev, lse_prev, offset).astype(q.dtype)
