"""The Mixtral decoder as pure functions over a parameter pytree.

Parameter layout (canonical; what `init_params` returns and checkpoints hold), x @ W orientation:

    embed                [V, D]       vocab, embed
    layers_{i}/attn_norm [D]          embed
    layers_{i}/wq        [D, N, H]    embed, q_heads, head_dim
    layers_{i}/wk, wv    [D, K, H]    embed, kv_heads, head_dim
    layers_{i}/wo        [N, H, D]    q_heads, head_dim, embed
    layers_{i}/ffn_norm  [D]          embed
    layers_{i}/router    [D, E]       embed, experts_replicated
    layers_{i}/w_gate    [E, D, F]    experts, embed, ffw      (w1)
    layers_{i}/w_up      [E, D, F]    experts, embed, ffw      (w3)
    layers_{i}/w_down    [E, F, D]    experts, ffw, embed      (w2)
    final_norm           [D]          embed
    lm_head              [D, V]       embed, vocab

A layer's leaves sit flat in one dict `params["layers_{i}"]`; a layer may also hold an optional
`router_bias` [E] (a routing intervention, `mixtral_jax.routing.intervene`; never in checkpoints) and
a `lora` adapter entry (`mixtral_jax.lora.attach`).
`load` returns, on CPU, the split layout instead (`split_experts`): each expert weight a tuple of E
per-expert matrices and each attention matrix one 2-D matrix, all in [out, in] orientation
(wq [N*H, D], wk and wv [K*H, D], wo [D, N*H]; a canonical attention matrix is never 2-D, which is
how the two are told apart); `forward` and `generate` accept both. The KV cache
(`init_cache`) is `{"lengths": [B] int32, "layers_{i}": {"k": [B, S, K, H], "v": [B, S, K, H]}}`, or
int8 with scales (mixtral_jax.kvcache).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import attention as attention_lib
from . import kernels, kvcache, lora
from .config import MixtralConfig
from .generation_config import sampling_defaults
from .kvcache import init_cache, layer_name
from .layers import apply_rope, rms_norm, rope_angles
from .moe import DEFAULT_GROUP_SIZE, STRATEGIES, is_split, moe
from .quant import dequantize, is_quantized, take_expert
from .sharding import constrain, mesh_of, sharding_for

log = logging.getLogger(__name__)

# A config carries no arrays: as a static pytree it can be passed straight to jit/eval_shape.
jax.tree_util.register_static(MixtralConfig)

INIT_STD = 0.02  # HF's initializer_range


class ParamSpec(NamedTuple):
    shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical axis names, mapped to mesh axes in sharding.py


def param_specs(config: MixtralConfig) -> dict[str, Any]:
    """Shape and logical axes of every parameter, in the canonical nested layout."""
    c = config
    d, n, k, h, f, e, v = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff, c.n_experts, c.vocab_size
    layer = {
        "attn_norm": ParamSpec((d,), ("embed",)),
        "wq": ParamSpec((d, n, h), ("embed", "q_heads", "head_dim")),
        "wk": ParamSpec((d, k, h), ("embed", "kv_heads", "head_dim")),
        "wv": ParamSpec((d, k, h), ("embed", "kv_heads", "head_dim")),
        "wo": ParamSpec((n, h, d), ("q_heads", "head_dim", "embed")),
        "ffn_norm": ParamSpec((d,), ("embed",)),
        "router": ParamSpec((d, e), ("embed", "experts_replicated")),
        "w_gate": ParamSpec((e, d, f), ("experts", "embed", "ffw")),
        "w_up": ParamSpec((e, d, f), ("experts", "embed", "ffw")),
        "w_down": ParamSpec((e, f, d), ("experts", "ffw", "embed")),
    }
    specs = {"embed": ParamSpec((v, d), ("vocab", "embed"))}
    specs.update({layer_name(i): dict(layer) for i in range(c.n_layers)})
    specs["final_norm"] = ParamSpec((d,), ("embed",))
    specs["lm_head"] = ParamSpec((d, v), ("embed", "vocab"))
    return specs


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def count_params(config: MixtralConfig) -> int:
    """Total parameters of the canonical layout."""
    return sum(math.prod(s.shape) for s in jax.tree.leaves(param_specs(config), is_leaf=_is_spec))


def init_params(config: MixtralConfig, seed: int = 0, dtype=jnp.float32) -> dict[str, Any]:
    """Random parameters as HF initialises them: N(0, 0.02) matrices, unit norms.

    Args:
      config: the model.
      seed: PRNG seed.
      dtype: parameter dtype.
    Returns:
      The canonical parameter pytree (layout in this module's docstring).
    """
    specs, treedef = jax.tree.flatten(param_specs(config), is_leaf=_is_spec)
    key = jax.random.key(seed)
    leaves = []
    for i, spec in enumerate(specs):
        if len(spec.shape) == 1:  # norms
            leaves.append(jnp.ones(spec.shape, dtype))
        else:
            leaves.append((INIT_STD * jax.random.normal(jax.random.fold_in(key, i), spec.shape,
                                                        jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, leaves)


EXPERT_LEAVES = ("w_gate", "w_up", "w_down")
# attention matrix -> how many of its canonical axes are inputs
ATTENTION_INPUT_AXES = {"wq": 1, "wk": 1, "wv": 1, "wo": 2}


def split_layer(layer: dict[str, Any]) -> dict[str, Any]:
    """A layer in the CPU layout: its [E, ...] expert weights split into tuples of E per-expert
    matrices in [out, in] orientation (w_gate, w_up [F, D]; w_down [D, F]; see mixtral_jax.moe),
    and its attention matrices 2-D in [out, in] orientation, int8 scales [out, 1] (the decode
    kernel reads each output's weights as one contiguous row; on Zen 5 batch-1 decode 1.015x
    float32, 1.03x bf16, 1.075x int8, BENCHMARKS.md). On host (numpy) arrays the matrices are
    views until placed on a device."""
    if is_split(layer["w_gate"]):
        return layer
    n_experts = jax.tree.leaves(layer["w_gate"])[0].shape[0]  # plain or int8 {"q", "scale"}

    def expert(w, e):
        return jax.tree.map(lambda a: a.T, take_expert(w, e))

    def out_in(w, n_in):  # int8 scales have 1s on the input axes, so they become [out, 1]
        return jax.tree.map(lambda a: a.reshape(math.prod(a.shape[:n_in]), -1).T, w)
    return {**layer, **{k: tuple(expert(layer[k], e) for e in range(n_experts)) for k in EXPERT_LEAVES},
            **{k: out_in(layer[k], n_in) for k, n_in in ATTENTION_INPUT_AXES.items()}}


def attention_out_in(layer: dict[str, Any]) -> bool:
    """Whether a layer's attention matrices are in the CPU layout's 2-D [out, in] form (its wq,
    plain or int8, is 2-D; a canonical wq is [D, N, H])."""
    w = layer["wq"]
    return (w["q"] if is_quantized(w) else w).ndim == 2


def split_experts(params) -> dict[str, Any]:
    """The CPU layout: per-expert leaves, so reading one expert never copies a slice of a stack."""
    return {k: split_layer(v) if k.startswith("layers_") else v for k, v in params.items()}


def default_layout(mesh=None) -> str:
    """'split' on CPU without a mesh (DESIGN.md §2: the fast CPU layout), else 'stacked'."""
    return "split" if mesh is None and jax.default_backend() == "cpu" else "stacked"


def default_dtype():
    """float32 on CPU (the only fast dtype there, DESIGN.md §2), bfloat16 on GPU/TPU."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_inputs(config, tokens, lengths, cache):
    """Host-side bounds checks (XLA would clamp or return NaN silently). Skipped under tracing."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integers, got {tokens.dtype}")
    b, t = tokens.shape
    if _is_concrete(tokens) and tokens.size:
        lo, hi = int(np.min(tokens)), int(np.max(tokens))
        if lo < 0 or hi >= config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} out of range [0, {config.vocab_size})")
    if lengths is not None:
        if lengths.shape != (b,):
            raise ValueError(f"lengths must have shape ({b},), got {lengths.shape}")
        if _is_concrete(lengths) and (np.any(np.asarray(lengths) < 0) or np.any(np.asarray(lengths) > t)):
            raise ValueError(f"lengths must lie in [0, {t}], got {np.asarray(lengths).tolist()}")
    if cache is not None:
        cache_len = cache["lengths"]
        slots = cache[layer_name(0)]["k"].shape[1]
        if cache_len.shape != (b,):
            raise ValueError(f"cache batch {cache_len.shape[0]} does not match tokens batch {b}")
        if _is_concrete(cache_len) and (lengths is None or _is_concrete(lengths)):
            new = t if lengths is None else np.asarray(lengths)
            end = np.asarray(cache_len) + new
            if np.any(end > slots):
                raise ValueError(f"KV cache overflow: {int(np.max(end))} tokens for {slots} slots")


def forward(config: MixtralConfig, params, tokens, *, lengths=None, cache=None,
            return_router_logits: bool = False, moe_strategy: str = "auto",
            capacity_factor: float | None = None, group_size: int = DEFAULT_GROUP_SIZE,
            attention: str = "auto", prefill_chunk: int | None = None):
    """Run the decoder.

    Args:
      config: the model.
      params: parameter pytree (canonical layout).
      tokens: int [B, T]; row b holds `lengths[b]` valid tokens followed by padding.
      lengths: int [B] valid tokens per row, or None when every token is valid.
      cache: KV cache from `init_cache` (or a previous call); new tokens are written after each
        row's `cache["lengths"]` and attend to everything before them.
      return_router_logits: also return router logits [L, B, T, E] float32.
      moe_strategy: "auto", "dense", "gather", "einsum", "sorted", "ragged" or "blocked" (see
        `mixtral_jax.moe`; "ragged" and "blocked" are the differentiable ones).
      capacity_factor: einsum only; None (default) never drops a token. When tokens are dropped
        a warning is logged with the count.
      group_size: einsum routing-group bound.
      attention: "auto", "materialized", "blockwise", "cudnn" or "splash" (see
        `mixtral_jax.attention`; all compute the same function).
      prefill_chunk: when T is longer, run the tokens through in chunks of this many, each against
        the cache the previous ones filled (one compiled program for every chunk), so the largest
        activation is one chunk's; without a cache, a temporary one of T slots is used. None or 0:
        all T at once.
    Parameters placed on a mesh (`load(..., mesh=)` or `shard_params`) run sharded: the mesh is
    read from the parameters, and activations are constrained by their logical axes.
    Returns:
      logits [B, T, V] float32; `(logits, cache)` when a cache is passed; router logits appended
      last when asked. Logits at padding positions are finite but meaningless.
    """
    tokens = jnp.asarray(tokens)
    lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    _check_inputs(config, tokens, lengths, cache)
    if moe_strategy not in STRATEGIES:
        raise ValueError(f"unknown MoE strategy {moe_strategy!r}; choose from {', '.join(STRATEGIES)}")
    attention_lib.check_name(attention)  # an unknown name fails here, before tracing
    check_prefill_chunk(prefill_chunk)
    run = functools.partial(_forward_jit, config, params, moe_strategy=moe_strategy,
                            capacity_factor=capacity_factor, group_size=group_size, mesh=mesh_of(params),
                            attention=attention)
    tokens = jnp.asarray(tokens, jnp.int32)
    if prefill_chunk and tokens.shape[1] > prefill_chunk:
        logits, new_cache, router_logits, dropped = _in_chunks(config, params, run, tokens, lengths, cache,
                                                               int(prefill_chunk))
    else:
        logits, new_cache, router_logits, dropped = run(tokens, lengths, cache)
    if capacity_factor is not None:
        jax.debug.callback(_report_dropped, dropped, capacity_factor)
    out = (logits,) if cache is None else (logits, new_cache)
    if return_router_logits:
        out += (router_logits,)
    return out[0] if len(out) == 1 else out


def check_prefill_chunk(value) -> None:
    """ValueError unless `value` is None or an integer >= 0 (0 and None: no chunking)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0):
        raise ValueError(f"prefill_chunk must be None or an integer >= 0 (0: no chunking), got {value!r}")


def _in_chunks(config, params, run, tokens, lengths, cache, chunk: int):
    """`run` (the jitted forward) over chunks of `chunk` tokens, the last one padded; outputs joined."""
    b, t = tokens.shape
    lengths = jnp.full((b,), t, jnp.int32) if lengths is None else lengths
    if cache is None:  # positions past max_seq_len are allowed without a cache, as unchunked
        work = init_cache(config.replace(max_seq_len=max(t, config.max_seq_len)), b, t, dtype=params["embed"].dtype)
    else:
        work = cache
    outs = []
    for start in range(0, t, chunk):
        part = jnp.pad(tokens[:, start:start + chunk], ((0, 0), (0, max(0, start + chunk - t))))
        logits, work, router_logits, dropped = run(part, jnp.clip(lengths - start, 0, chunk), work)
        outs.append((logits, router_logits, dropped))
    logits = jnp.concatenate([o[0] for o in outs], axis=1)[:, :t]
    router_logits = jnp.concatenate([o[1] for o in outs], axis=2)[:, :, :t]
    return logits, None if cache is None else work, router_logits, sum(o[2] for o in outs)


def _report_dropped(dropped, capacity_factor):
    if int(dropped):
        log.warning("MoE capacity factor %s dropped %d token-expert assignments", capacity_factor,
                    int(dropped))


REMAT = ("none", "layer", "dots")


class Segment(NamedTuple):
    """Sequences that run through the decoder together with other segments (`decoder_segments`).

    tokens: [B, T] int32; lengths: [B] valid tokens per row (None: all T); rows: [B] int32 the
    cache rows they live in (None: row b for sequence b)."""
    tokens: jax.Array
    lengths: jax.Array | None = None
    rows: jax.Array | None = None


class _Positions(NamedTuple):
    """A segment's per-token positions and masks, shared by every layer."""
    rope: tuple
    q_pos: jax.Array        # [B, T]
    q_valid: jax.Array      # [B, T]
    new_len: jax.Array      # [B]
    offset: jax.Array       # [B] cache slots filled before this call
    write_pos: jax.Array | None  # [B, T] cache slot per token (S: dropped)
    rows: jax.Array | None


def decoder(config: MixtralConfig, params, tokens, lengths, cache, *, cache_rows=None, **kwargs):
    """The traced body of `forward` without the output projection: `decoder_segments` with one
    segment (keyword arguments as there).

    Returns:
      (hidden [B, T, D] after the final norm, cache or None, router logits [L, B, T, E], dropped).
    """
    (hidden,), cache, (router_logits,), dropped = decoder_segments(
        config, params, [Segment(tokens, lengths, cache_rows)], cache, **kwargs)
    return hidden, cache, router_logits, dropped


def decoder_segments(config: MixtralConfig, params, segments, cache, *, moe_strategy="auto", capacity_factor=None,
                     group_size=DEFAULT_GROUP_SIZE, mesh=None, attention="auto", remat="none"):
    """Several batches of sequences through the decoder at once: each segment attends within its
    own cache rows, and all their tokens share each layer's MoE, so the expert weights are read
    once per layer for all of them (a server's prompt chunk and its decode step in one pass).

    Segments with a cache: `rows` place a segment in some of the cache's rows (one request's
    prompt chunk written straight into its own row of a server's cache); their rows may overlap
    only where one of them has no valid tokens, and the cache's lengths are updated in segment
    order.

    `remat` (training): "layer" recomputes each decoder layer in the backward pass from its input
    (`jax.checkpoint`, nothing saved); "dots" keeps the layer's matmul outputs and recomputes the
    rest; "none" keeps everything.

    Returns:
      (per segment hidden [B, T, D] after the final norm, cache or None, per segment router logits
      [L, B, T, E], dropped).
    """
    if remat not in REMAT:
        raise ValueError(f"remat must be one of {', '.join(REMAT)}, got {remat!r}")
    attention_lib.check_name(attention)
    positions, xs = [], []
    new_cache = None if cache is None else {"lengths": cache["lengths"]}
    for seg in segments:
        b, t = seg.tokens.shape
        new_len = jnp.full((b,), t, jnp.int32) if seg.lengths is None else seg.lengths
        offset = (jnp.zeros((b,), jnp.int32) if cache is None
                  else cache["lengths"] if seg.rows is None else cache["lengths"][seg.rows])
        q_pos = offset[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]         # [B, T]
        q_valid = jnp.arange(t)[None, :] < new_len[:, None]                        # [B, T]
        # Padding tokens are written to slot S, which the scatter drops.
        write_pos = None if cache is None else jnp.where(q_valid, q_pos, cache[layer_name(0)]["k"].shape[1])
        positions.append(_Positions(rope_angles(q_pos, config.head_dim, config.rope_theta), q_pos, q_valid,
                                    new_len, offset, write_pos, seg.rows))
        xs.append(constrain(embed_rows(params["embed"], seg.tokens), ACT, mesh))     # [B, T, D]
        if cache is not None:
            new_cache["lengths"] = (offset + new_len if seg.rows is None
                                    else new_cache["lengths"].at[seg.rows].set(offset + new_len))
    block = functools.partial(_block, config, moe_strategy=moe_strategy, capacity_factor=capacity_factor,
                              group_size=group_size, mesh=mesh, attention=attention)
    if remat != "none":
        policy = (jax.checkpoint_policies.nothing_saveable if remat == "layer"
                  else jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
        block = jax.checkpoint(block, policy=policy)
    router_logits, dropped = [[] for _ in segments], jnp.zeros((), jnp.int32)
    for i in range(config.n_layers):
        layer_cache = None if cache is None else cache[layer_name(i)]
        xs, layer_cache, logits_i, dropped_i = block(params[layer_name(i)], xs, positions, layer_cache)
        if cache is not None:
            new_cache[layer_name(i)] = layer_cache
        for j, logits in enumerate(logits_i):
            router_logits[j].append(logits)
        dropped = dropped + dropped_i
    hidden = [rms_norm(x, params["final_norm"], config.norm_eps) for x in xs]
    return hidden, new_cache, [jnp.stack(r) for r in router_logits], dropped


@jax.custom_jvp
def embed_rows(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """table [V, D] rows at tokens [...] -> [..., D]. bfloat16 rows are looked up as their uint16
    bits: XLA:CPU widens a bfloat16 slice to float32, and in `generate`'s decode loop (one token, a
    dynamic slice) it hoisted that widening of the whole table out of the loop, a float32 copy of
    the table on every call (131 MB for `small`; 10-14 ms of a 16-token bf16 generate on Zen 5)."""
    if table.dtype != jnp.bfloat16:
        return table[tokens]
    bits = jax.lax.bitcast_convert_type(table, jnp.uint16)[tokens]
    return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)


@embed_rows.defjvp
def _embed_rows_jvp(primals, tangents):
    table, tokens = primals
    return embed_rows(table, tokens), tangents[0][tokens]


def _block(config, p, xs, positions, layer_cache, *, moe_strategy, capacity_factor, group_size, mesh, attention):
    """One decoder layer over the segments' activations xs (each [B, T, D]) -> (xs, the layer's
    cache or None, per segment router logits [B, T, E], dropped)."""
    p = lora.apply_to_layer(p)  # a LoRA adapter's update, formed here so one layer's exists at a time
    kv_axes = ("batch", "cache_sequence", "kv_heads", "head_dim")
    hs = [rms_norm(x, p["attn_norm"], config.norm_eps) for x in xs]
    out_in = attention_out_in(p)
    q_shape, kv_shape = (config.n_heads, config.head_dim), (config.n_kv_heads, config.head_dim)
    qkv = []
    for h, pos in zip(hs, positions):
        cos, sin = pos.rope
        q = apply_rope(_project(h, p["wq"], "btd,dnh->btnh", q_shape, out_in, mesh), cos, sin)   # [B, T, N, H]
        q = constrain(q, ("batch", "sequence", "q_heads", "head_dim"), mesh)
        k = apply_rope(_project(h, p["wk"], "btd,dkh->btkh", kv_shape, out_in, mesh), cos, sin)  # [B, T, K, H]
        v = _project(h, p["wv"], "btd,dkh->btkh", kv_shape, out_in, mesh)                        # [B, T, K, H]
        qkv.append((q, k, v))
        if layer_cache is not None:
            # Every segment writes before any reads: a write after a read of the same cache would
            # make XLA copy the whole cache to keep the version read.
            layer_cache = kvcache.write(layer_cache, k, v, pos.write_pos, pos.rows)   # [R, S, K, H] (+ scales)
            layer_cache = {name: constrain(a, kv_axes[:a.ndim], mesh) for name, a in layer_cache.items()}
    attended = []
    for x, (q, k, v), pos in zip(xs, qkv, positions):
        b, t = pos.q_pos.shape
        chunk = attention_lib.Chunk(k, v, pos.new_len, None if layer_cache is None else pos.offset)
        if layer_cache is not None:
            k, v = kvcache.read(layer_cache)
        attn = attention_lib.attend(attention, q, k, v, pos.q_pos, pos.offset + pos.new_len, chunk,
                                    sliding_window=config.sliding_window, rows=pos.rows, mesh=mesh)  # [B, T, N, H]
        # [B, T, N*H] @ [N*H, D]: XLA's CPU dot contracting (n, h) directly runs ~13x slower
        wo = p["wo"] if out_in else kernels.flatten(p["wo"], 2)
        o = _project(attn.reshape(b, t, -1), wo, "btk,kd->btd", (config.d_model,), out_in, mesh)  # [B, T, D]
        attended.append(constrain(x + o, ACT, mesh))
    h = jnp.concatenate([rms_norm(x, p["ffn_norm"], config.norm_eps).reshape(-1, x.shape[-1]) for x in attended])
    valid = jnp.concatenate([pos.q_valid.reshape(-1) for pos in positions])
    y, logits, dropped = moe(h, p, top_k=config.top_k, valid=valid, strategy=moe_strategy,
                             capacity_factor=capacity_factor, group_size=group_size, mesh=mesh)
    out, out_logits, at = [], [], 0
    for x in attended:
        n = x.shape[0] * x.shape[1]
        out.append(constrain(x + y[at:at + n].reshape(x.shape), ACT, mesh))
        out_logits.append(logits[at:at + n].reshape(*x.shape[:2], -1))
        at += n
    return out, layer_cache, out_logits, dropped


def _project(h, w, spec: str, out_shape: tuple[int, ...], out_in: bool, mesh):
    """h [B, T, I] times a weight (plain or int8), canonical [*in, *out] (`spec` its einsum) or,
    with `out_in`, the CPU layout's [prod(out), I] -> [B, T, *out_shape], on the CPU kernel for a
    few rows (`mixtral_jax.kernels`), else XLA's dot."""
    b, t = h.shape[:2]
    x = h.reshape(b * t, -1)                                                        # [B*T, I]
    if out_in:
        if kernels.fits(b * t, w, mesh=mesh):
            y = kernels.linear(x, w, nk=True)                                       # [B*T, O]
        else:
            y = jnp.einsum("mi,oi->mo", x, dequantize(w, h.dtype))                  # [B*T, O]
        return y.reshape(b, t, *out_shape)
    w2 = kernels.flatten(w, h.ndim - 2)                                             # [I, O]
    if kernels.fits(b * t, w2, mesh=mesh):
        return kernels.linear(x, w2).reshape(b, t, *out_shape)
    return jnp.einsum(spec, h, dequantize(w, h.dtype))


ACT = ("batch", "sequence", "act_embed")


def lm_head(params, x: jax.Array, mesh=None) -> jax.Array:
    """float32 logits [..., V] of final hidden states [..., D] (on the CPU kernel for a few rows
    without a mesh)."""
    x2 = x.reshape(-1, x.shape[-1])                                                 # [B*T, D]
    if kernels.fits(x2.shape[0], params["lm_head"], mesh=mesh):
        return kernels.linear(x2, params["lm_head"]).reshape(*x.shape[:-1], -1).astype(jnp.float32)
    # One 2-D dot: XLA's CPU dot with batch dims [B, T] ran 2x slower (forward and backward of a
    # [8, 512, 192] x [192, 32000] training projection).
    logits = jnp.einsum("td,dv->tv", x2, params["lm_head"])                         # [B*T, V]
    return logits.reshape(*x.shape[:-1], -1).astype(jnp.float32)


def _forward_all(config, params, tokens, lengths, cache, **kwargs):
    x, cache, router_logits, dropped = decoder(config, params, tokens, lengths, cache, **kwargs)
    return lm_head(params, x, kwargs.get("mesh")), cache, router_logits, dropped


_forward_jit = jax.jit(_forward_all,
                       static_argnames=("moe_strategy", "capacity_factor", "group_size", "mesh", "attention"))


def shard_params(config: MixtralConfig, params, mesh):
    """Place a parameter pytree on `mesh`, each leaf split per its logical axes."""
    return jax.tree.map(lambda spec, a: jax.device_put(a, sharding_for(spec.shape, spec.axes, mesh)),
                        param_specs(config), params, is_leaf=_is_spec)


@dataclasses.dataclass
class Model:
    """A loaded model: config, parameters, (optionally) its tokenizer, and the generation defaults
    its checkpoint carries (`generation_config.json`, validated; {} when none)."""
    config: MixtralConfig
    params: Any
    tokenizer: Any = None
    generation_config: dict = dataclasses.field(default_factory=dict)

    def __call__(self, tokens, **kwargs):
        return forward(self.config, self.params, tokens, **kwargs)

    def generation_config_kwargs(self) -> dict:
        """The checkpoint's generation defaults as `generate` keyword arguments:
        `mj.generate(model, prompts, **model.generation_config_kwargs())`."""
        return sampling_defaults(self.generation_config)
