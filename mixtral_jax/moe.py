"""The sparse mixture-of-experts layer: a float32 top-k router and interchangeable dispatch strategies.

Every strategy computes y = sum_{e in top-k(x)} g_e(x) * w_down_e(silu(x w_gate_e) * (x w_up_e)),
exactly (no dropped tokens unless a capacity factor is asked for):

- `dense`: every expert on every token, weighted by the (mostly zero) gates. The test oracle.
- `gather`: reads only the selected experts' weights, one copy per (token, slot). For decode
  with stacked weights.
- `einsum`: GShard dispatch/combine one-hot einsums over bounded routing groups with an expert
  capacity C; the expert axis of the dispatched activations is what expert parallelism shards.
- `sorted`: assignments sorted by expert; each expert steps through its contiguous run of tokens up
  to 32 rows at a time (a `while_loop`, so one compiled body per expert whatever the
  counts); it drops nothing and pads at most one partial step per expert. The fast exact path on one
  device with split weights, decode and prefill alike.
- `ragged`: assignments sorted by expert, then `lax.ragged_dot` grouped matmuls. Differentiable
  (`sorted`'s data-dependent loop is not), so it is the exact training path on TPU/GPU and their
  natural prefill. On CPU XLA pads the groups, so it is slower than `sorted` there.
- `blocked`: assignments sorted by expert into fixed-size blocks, each expert's run padded to whole
  blocks, then one batched matmul over the blocks with each block's expert weights gathered.
  Differentiable and static-shaped: the training path on CPU (4.5x faster than `ragged` there for
  the demo model's layer, forward and backward). Gathering weights per block suits small experts
  only: at Mixtral's size the copies would cost more than the matmuls.
- `kernel`: the whole layer as one CPU custom call (`mixtral_jax.kernels`) for up to
  `kernels.moe_max_rows()` tokens (512 with AVX-512 or AVX2, else 16) with split weights: only the
  selected experts are read, float32, bfloat16 or int8 weights widened in registers. What `auto`
  picks on CPU when the kernels are built, for decode and prompt chunks; otherwise (and for
  `kernel` asked for where it cannot run) `sorted` runs.

Expert weights come stacked ([E, D, F] arrays, the canonical layout) or split, the CPU layout `load`
returns: a tuple of E per-expert matrices per weight, each in [out, in] orientation (w_gate and w_up
[F, D], w_down [D, F]). Per-expert leaves because XLA copies a slice of a stacked parameter before a
dot, so only they let `gather` and `sorted` read just what they use; [out, in] because XLA's CPU
matmul with the weight as the left operand and few activation columns runs near the read bound
(measured at 2-32 rows: about half the time of x @ W; BENCHMARKS.md). Split experts therefore work on
transposed activations [D, rows].

Einsum alphabet: T tokens (flattened batch), D d_model, F ffw, E experts, X top-k slot,
g routing group, t token within a group, c capacity slot, n block, r row within a block.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import kernels
from .quant import dequantize, take_expert
from .sharding import constrain, experts_split, token_group_multiple

STRATEGIES = ("auto", "dense", "gather", "einsum", "sorted", "ragged", "blocked", "kernel")
DEFAULT_GROUP_SIZE = 512


class Routing(NamedTuple):
    """Router output for T tokens."""
    logits: jax.Array   # [T, E] float32
    weights: jax.Array  # [T, X] float32, sums to 1 per token
    experts: jax.Array  # [T, X] int32, ties broken toward the lower expert index


def route(x: jax.Array, router: jax.Array, top_k: int, bias: jax.Array | None = None) -> Routing:
    """Top-k routing in float32: softmax over the k largest logits.

    This equals HF's softmax over all experts, top-k, renormalise (the tests check it).

    Args:
      x: [T, D] activations.
      router: [D, E] router weights.
      top_k: experts per token.
      bias: optional [E] added to the logits for the selection only (an intervention: -inf
        disables an expert, +inf forces it); the gates stay the softmax of the selected logits.
    Returns:
      Routing with logits [T, E], weights [T, X], experts [T, X].
    """
    logits = jnp.einsum("td,de->te", x.astype(jnp.float32), router.astype(jnp.float32))  # [T, E]
    select = logits if bias is None else logits + bias.astype(jnp.float32)
    _, experts = jax.lax.top_k(select, top_k)  # lax.top_k keeps the lower index on ties
    top_logits = jnp.take_along_axis(logits, experts, axis=-1)                            # [T, X]
    return Routing(logits, jax.nn.softmax(top_logits, axis=-1), experts.astype(jnp.int32))


def _swiglu(x, w_gate, w_up, w_down, spec_in: str, spec_out: str):
    """SwiGLU with einsum specs, e.g. ('td,edf->tef', 'tef,efd->ted')."""
    h = jax.nn.silu(jnp.einsum(spec_in, x, w_gate)) * jnp.einsum(spec_in, x, w_up)
    return jnp.einsum(spec_out, h, w_down)


def _expert_ffn(x, w_gate, w_up, w_down):
    """One expert on its rows: x [c, D] -> [c, D], canonical weights (int8 weights are dequantized
    here, so only the experts that run are)."""
    w_gate, w_up, w_down = (dequantize(w, x.dtype) for w in (w_gate, w_up, w_down))
    return _swiglu(x, w_gate, w_up, w_down, "cd,df->cf", "cf,fd->cd")


def _expert_ffn_t(xt, w_gate, w_up, w_down):
    """One split expert on transposed rows: xt [D, c] -> [D, c], weights [out, in]."""
    w_gate, w_up, w_down = (dequantize(w, xt.dtype) for w in (w_gate, w_up, w_down))
    return _swiglu(xt, w_gate, w_up, w_down, "dc,fd->fc", "fc,df->dc")  # [F, c] hidden


def is_split(w) -> bool:
    """Whether expert weights are split into per-expert leaves (a tuple of E arrays)."""
    return isinstance(w, (tuple, list))


def _stacked(weights, dtype):
    """(w_gate, w_up, w_down) as dequantized canonical [E, ...] arrays; split leaves are stacked
    and turned back to [in, out] (a copy)."""
    def stack(w):
        if not is_split(w):
            return w
        return jax.tree.map(lambda *a: jnp.stack(a).swapaxes(-1, -2), *w)
    return tuple(dequantize(stack(w), dtype) for w in weights)


def moe_dense(x, routing: Routing, weights) -> jax.Array:
    """Oracle: all E experts on all T tokens. x [T, D]; weights (w_gate, w_up, w_down)."""
    n_experts = routing.logits.shape[-1]
    gates = jnp.einsum("tx,txe->te", routing.weights,
                       jax.nn.one_hot(routing.experts, n_experts, dtype=jnp.float32))  # [T, E]
    if is_split(weights[0]):
        xt = x.T                                                                     # [D, T]
        yt = sum(gates[None, :, e] * _expert_ffn_t(xt, *(w[e] for w in weights)).astype(jnp.float32)
                 for e in range(n_experts))                                         # [D, T]
        return yt.T.astype(x.dtype)
    out = _swiglu(x, *_stacked(weights, x.dtype), "td,edf->tef", "tef,efd->ted")  # [T, E, D]
    return jnp.einsum("te,ted->td", gates, out.astype(jnp.float32)).astype(x.dtype)


def moe_gather(x, routing: Routing, weights) -> jax.Array:
    """Reads only the selected experts' weights. Split weights: a `lax.switch` over experts per
    (token, slot) (up to 2E of them; beyond, the weights are stacked first); stacked weights:
    [T, X] gathered copies of the selected [D, F] matrices."""
    t, k = routing.experts.shape
    if is_split(weights[0]) and t * k > 2 * len(weights[0]):
        weights = _stacked(weights, x.dtype)  # one switch per (token, slot) stops paying off
    if is_split(weights[0]):
        n_experts = len(weights[0])
        branches = [lambda col, e=e: _expert_ffn_t(col, *(w[e] for w in weights)) for e in range(n_experts)]
        xt = x.T                                                                     # [D, T]
        y = jnp.zeros(x.shape, jnp.float32)
        for i in range(t):
            for slot in range(k):
                out = jax.lax.switch(routing.experts[i, slot], branches, xt[:, i:i + 1])  # [D, 1]
                y = y.at[i].add(routing.weights[i, slot] * out[:, 0].astype(jnp.float32))
        return y.astype(x.dtype)
    idx = routing.experts
    w_gate, w_up, w_down = (dequantize(take_expert(w, idx), x.dtype) for w in weights)  # [T, X, ...]
    out = _swiglu(x, w_gate, w_up, w_down, "td,txdf->txf", "txf,txfd->txd")     # [T, X, D]
    return jnp.einsum("tx,txd->td", routing.weights, out.astype(jnp.float32)).astype(x.dtype)


def sorted_chunk(n_tokens: int, n_experts: int, top_k: int) -> int:
    """Rows per expert step for `sorted`: all tokens up to 32, else 32. Measured on the small
    config's MoE layer (split weights, T = 100 and 512): 32-row steps beat 8, 16, 24, 40, 48, 64
    and 128; smaller steps pay per-step overhead, larger ones pad more of each expert's last step."""
    del n_experts, top_k  # the measured cost curve depends on rows only
    return min(n_tokens, 32)


def moe_sorted(x, routing: Routing, valid, weights, *, chunk: int | None = None) -> jax.Array:
    """Exact MoE with assignments sorted by expert; each expert steps through its contiguous run of
    rows `chunk` at a time in a `while_loop` (one compiled body per expert, whatever the token
    counts).

    The rows are gathered into expert order once; each step slices its rows and writes its outputs
    back in place. A step reaching past its expert's run computes rows that belong to the next
    experts (or to the tail), which those experts then overwrite, as they run later; so every
    output is the one its own expert wrote. Outputs return to token order and are weighted once,
    after the loops.

    Args:
      x: [T, D]; valid: [T] bool (padding takes no rows); weights: split or stacked.
      chunk: rows per step (default `sorted_chunk`).
    Returns:
      y [T, D].
    """
    n_tokens, k = routing.experts.shape
    n_experts = routing.logits.shape[-1]
    rows = chunk or sorted_chunk(n_tokens, n_experts, k)
    experts = jnp.where(valid[:, None], routing.experts, n_experts).reshape(-1)   # [T*X], pad -> E
    order = jnp.argsort(experts, stable=True)
    tail = jnp.zeros((rows,), jnp.int32)                                           # room to read past the end
    token_of = jnp.concatenate([(jnp.arange(n_tokens * k, dtype=jnp.int32) // k)[order], tail])
    counts = jnp.bincount(experts, length=n_experts + 1)[:n_experts]               # [E]
    starts = jnp.cumsum(counts) - counts
    split = is_split(weights[0])
    xs = x[token_of]                                                               # [T*X + rows, D]
    # Split experts write [D, rows] blocks: a transpose right after the last matmul would be folded
    # into it, in XLA CPU's slow orientation, so their outputs stay transposed until after the loops.
    out_axis = 1 if split else 0
    outs = jnp.zeros(xs.shape[::-1] if split else xs.shape, jnp.float32)          # [D, T*X + rows] or transposed
    for e in range(n_experts):
        w_e = tuple(take_expert(w, e) for w in weights)

        def step(i, outs, e=e, w_e=w_e):
            at = starts[e] + i * rows
            xr = jax.lax.dynamic_slice_in_dim(xs, at, rows, 0)                      # [rows, D]
            out = _expert_ffn_t(xr.T, *w_e) if split else _expert_ffn(xr, *w_e)     # [D, rows] / [rows, D]
            return jax.lax.dynamic_update_slice_in_dim(outs, out.astype(jnp.float32), at, out_axis)

        outs = jax.lax.fori_loop(0, (counts[e] + rows - 1) // rows, step, outs)
    outs = outs.T if split else outs                                               # [T*X + rows, D]
    per_slot = outs[jnp.argsort(order)].reshape(n_tokens, k, -1)                   # [T, X, D] token order
    gates = jnp.where(valid[:, None], routing.weights, 0.0)                        # padding rows: unwritten
    return jnp.einsum("tx,txd->td", gates, per_slot).astype(x.dtype)


def kernel_fits(n_tokens: int, weights, mesh=None) -> bool:
    """Whether `kernel` can run: split weights the kernels take, few enough tokens, kernels on."""
    return is_split(weights[0]) and kernels.fits(n_tokens, *(w[0] for w in weights), mesh=mesh,
                                                  max_rows=kernels.moe_max_rows())


def _moe_pure(x, experts, gates, weights):
    """`moe_kernel`'s computation in pure JAX (the dense oracle: differentiable, so it is the
    kernel's backward pass). experts [T, X] with -1 for skipped assignments."""
    skip = experts < 0
    routing = Routing(jnp.zeros((x.shape[0], len(weights[0])), jnp.float32),
                      jnp.where(skip, 0.0, gates), jnp.where(skip, 0, experts))
    return moe_dense(x, routing, weights)


def moe_kernel(x, routing: Routing, valid, weights) -> jax.Array:
    """The layer as one CPU custom call (see `kernel_fits`). x [T, D]; valid [T] -> y [T, D]."""
    experts = jnp.where(valid[:, None], routing.experts, -1)                       # [T, X]
    return kernels.moe(x, experts, routing.weights, weights, pure=_moe_pure)


def moe_ragged(x, routing: Routing, valid, weights) -> jax.Array:
    """Exact MoE as grouped matmuls over assignments sorted by expert (differentiable).

    Args:
      x: [T, D]; valid: [T] bool (padding assignments get zero gates); weights: split or stacked
        (split ones are stacked first: a copy).
    Returns:
      y [T, D].
    """
    n_tokens, k = routing.experts.shape
    n_experts = routing.logits.shape[-1]
    w_gate, w_up, w_down = _stacked(weights, x.dtype)
    experts = jnp.where(valid[:, None], routing.experts, n_experts).reshape(-1)   # [T*X], pad -> E
    order = jnp.argsort(experts, stable=True)
    token_of = (jnp.arange(n_tokens * k, dtype=jnp.int32) // k)[order]
    gate = jnp.where(experts[order] < n_experts, routing.weights.reshape(-1)[order], 0.0)
    counts = jnp.bincount(experts, length=n_experts + 1)
    sizes = counts[:n_experts].at[-1].add(counts[-1])        # padding rides in the last group, gated 0
    xs = x[token_of]                                                                # [T*X, D]
    h = (jax.nn.silu(jax.lax.ragged_dot(xs, w_gate, sizes))
         * jax.lax.ragged_dot(xs, w_up, sizes))                                     # [T*X, F]
    out = jax.lax.ragged_dot(h, w_down, sizes).astype(jnp.float32)                  # [T*X, D]
    y = jnp.zeros(x.shape, jnp.float32).at[token_of].add(gate[:, None] * out)
    return y.astype(x.dtype)


def blocked_rows(n_assignments: int, n_experts: int) -> int:
    """Rows per block for `blocked`: 128 (measured on the demo model's layer at 8 x 512 tokens: 128
    and 256 tie, 64 is 1.5x slower), fewer when each expert averages fewer assignments."""
    per_expert = -(-n_assignments // n_experts)
    return min(128, max(8, 1 << max(0, per_expert - 1).bit_length()))


def moe_blocked(x, routing: Routing, valid, weights, *, rows: int | None = None) -> jax.Array:
    """Exact MoE over blocks of `rows` assignments, each block one expert's (differentiable).

    Assignments are sorted by expert; each expert's run starts a new block, so its last block is
    partly empty (those rows read token 0 and get zero gates). There are at most
    ceil(T*X / rows) + E blocks, a static bound. Each block's expert weights are gathered and all
    blocks run as one batched matmul.

    Args:
      x: [T, D]; valid: [T] bool (padding takes no rows); weights: split or stacked (split ones
        are stacked first: a copy).
      rows: rows per block (default `blocked_rows`).
    Returns:
      y [T, D].
    """
    n_tokens, k = routing.experts.shape
    n_experts = routing.logits.shape[-1]
    w_gate, w_up, w_down = _stacked(weights, x.dtype)
    n_assign = n_tokens * k
    rows = rows or blocked_rows(n_assign, n_experts)
    n_blocks = -(-n_assign // rows) + n_experts
    experts = jnp.where(valid[:, None], routing.experts, n_experts).reshape(-1)    # [T*X], pad -> E
    order = jnp.argsort(experts, stable=True)
    sorted_experts = experts[order]
    counts = jnp.bincount(experts, length=n_experts + 1)[:n_experts]               # [E]
    padded = -(-counts // rows) * rows
    block_end = jnp.cumsum(padded)                                                  # [E] in rows
    run_start = jnp.cumsum(counts) - counts
    e = jnp.minimum(sorted_experts, n_experts - 1)
    dest = jnp.where(sorted_experts < n_experts,
                     block_end[e] - padded[e] + jnp.arange(n_assign) - run_start[e], n_blocks * rows)
    token_of = jnp.zeros((n_blocks * rows,), jnp.int32).at[dest].set(
        (jnp.arange(n_assign, dtype=jnp.int32) // k)[order], mode="drop")           # [n*rows]
    gate_of = jnp.zeros((n_blocks * rows,), jnp.float32).at[dest].set(
        routing.weights.reshape(-1)[order], mode="drop")                            # [n*rows]
    block_expert = jnp.minimum(jnp.searchsorted(block_end, jnp.arange(n_blocks) * rows, side="right"),
                               n_experts - 1)                                       # [n]
    xb = x[token_of].reshape(n_blocks, rows, -1)                                    # [n, rows, D]
    out = _swiglu(xb, w_gate[block_expert], w_up[block_expert], w_down[block_expert],
                  "nrd,ndf->nrf", "nrf,nfd->nrd")                                   # [n, rows, D]
    out = out.reshape(n_blocks * rows, -1).astype(jnp.float32)
    y = jnp.zeros(x.shape, jnp.float32).at[token_of].add(gate_of[:, None] * out)
    return y.astype(x.dtype)


def einsum_capacity(group_size: int, n_experts: int, top_k: int, capacity_factor: float | None) -> int:
    """Expert capacity C per routing group; None means dropless (C = group size)."""
    if capacity_factor is None:
        return group_size  # a token picks an expert at most once, so no expert gets more than G
    return max(1, min(group_size, math.ceil(capacity_factor * group_size * top_k / n_experts)))


def moe_einsum(x, routing: Routing, valid, weights, *,
               group_size: int = DEFAULT_GROUP_SIZE, capacity_factor: float | None = None, mesh=None):
    """GShard dispatch/combine over routing groups of at most `group_size` tokens.

    Within a group, all first choices are placed before any second choice (GShard's priority), each
    expert keeps the first C assignments, and later ones are dropped and counted.

    Args:
      x: [T, D]; valid: [T] bool (padding tokens take no capacity); weights as in `moe_dense`
        (split weights are stacked first: a copy; this strategy is for meshes).
      group_size: routing group bound; keeps the one-hot einsums' cost at 2G/(3F) of the experts'.
      capacity_factor: None for dropless, else C = ceil(cf * G * top_k / E).
      mesh: when given, groups are split over the mesh before dispatch and experts after it
        (logical axes "token_groups" and "groups"/"experts"), which makes the all-to-all.
    Returns:
      (y [T, D], dropped: int32 count of (token, slot) assignments that were dropped).
    """
    n_tokens, d = x.shape
    w_gate, w_up, w_down = _stacked(weights, x.dtype)
    n_experts = w_gate.shape[0]
    split = token_group_multiple(mesh)
    g_size = max(1, min(group_size, -(-n_tokens // split)))
    n_groups = -(-n_tokens // (g_size * split)) * split
    pad = n_groups * g_size - n_tokens
    capacity = einsum_capacity(g_size, n_experts, routing.experts.shape[-1], capacity_factor)

    def grouped(a):
        return jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(n_groups, g_size, *a.shape[1:])

    xg = constrain(grouped(x), ("token_groups", None, "act_embed"), mesh)  # [g, t, D]
    assigned = (jax.nn.one_hot(grouped(routing.experts), n_experts, dtype=jnp.int32)
                * grouped(valid)[..., None, None])                    # [g, t, X, E]
    # Slot-major priority: position of each assignment in its expert's queue.
    slot_major = assigned.transpose(0, 2, 1, 3).reshape(n_groups, -1, n_experts)
    position = (jnp.cumsum(slot_major, axis=1) - 1).reshape(assigned.transpose(0, 2, 1, 3).shape)
    position = position.transpose(0, 2, 1, 3)                         # [g, t, X, E]
    kept = assigned * (position < capacity)
    dropped = jnp.sum(assigned) - jnp.sum(kept)
    slot = jax.nn.one_hot(jnp.sum(position * kept, axis=-1), capacity, dtype=jnp.float32)  # [g,t,X,c]
    dispatch = jnp.einsum("gtxe,gtxc->gtec", kept.astype(jnp.float32), slot)  # [g, t, E, c]
    combine = jnp.einsum("gtxe,gtxc,gtx->gtec", kept.astype(jnp.float32), slot,
                         grouped(routing.weights))                    # [g, t, E, c]

    expert_axes = ("groups", "experts", "capacity", "act_embed")
    expert_in = jnp.einsum("gtec,gtd->gecd", dispatch.astype(x.dtype), xg)  # [g, E, c, D]
    expert_in = constrain(expert_in, expert_axes, mesh)
    expert_out = _swiglu(expert_in, w_gate, w_up, w_down, "gecd,edf->gecf", "gecf,efd->gecd")
    expert_out = constrain(expert_out, expert_axes, mesh)                   # [g, E, c, D]
    y = jnp.einsum("gtec,gecd->gtd", combine, expert_out.astype(jnp.float32))  # [g, t, D]
    y = constrain(y, ("token_groups", None, "act_embed"), mesh)
    return y.reshape(-1, d)[:n_tokens].astype(x.dtype), dropped.astype(jnp.int32)


def choose_strategy(n_tokens: int, n_experts: int, top_k: int, mesh=None, split: bool = False,
                    kernel: bool = False) -> str:
    """`auto`: einsum when experts are split across devices (tokens move, weights stay); the CPU
    kernel when it fits (`kernel`); sorted for split (CPU) weights, where it reads only the
    selected experts and measured fastest of the pure-JAX paths at every token count, decode
    included; for stacked weights gather when the selected experts are fewer than all experts
    (decode: a slice of a stacked weight inside a loop may be copied whether it runs or not),
    else sorted."""
    if experts_split(mesh):
        return "einsum"
    if kernel:
        return "kernel"
    if split:
        return "sorted"
    return "gather" if n_tokens * top_k < n_experts else "sorted"


def moe(x, layer, *, top_k: int, valid=None, strategy: str = "auto",
        capacity_factor: float | None = None, group_size: int = DEFAULT_GROUP_SIZE, mesh=None):
    """The MoE layer over flattened tokens.

    Args:
      x: [T, D] activations.
      layer: a layer's parameters with `router` [D, E], `w_gate`/`w_up` [E, D, F], `w_down` [E, F, D]
        (or split: tuples of E per-expert arrays), and optionally `router_bias` [E] (see `route`).
      top_k: experts per token.
      valid: [T] bool, False for padding tokens (None: all valid).
      strategy: one of STRATEGIES.
      capacity_factor: einsum only; None is dropless.
      group_size: einsum routing group bound.
      mesh: the device mesh for sharding constraints, or None.
    Returns:
      (y [T, D] in x's dtype, router logits [T, E] float32, dropped assignments int32 scalar).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown MoE strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor!r}")
    routing = route(x, layer["router"], top_k, layer.get("router_bias"))
    weights = (layer["w_gate"], layer["w_up"], layer["w_down"])
    if strategy == "auto":
        strategy = choose_strategy(x.shape[0], routing.logits.shape[-1], top_k, mesh, is_split(weights[0]),
                                   kernel_fits(x.shape[0], weights, mesh))
    elif strategy == "kernel" and not kernel_fits(x.shape[0], weights, mesh):
        strategy = "sorted"
    if valid is None:
        valid = jnp.ones(x.shape[:1], bool)
    dropped = jnp.zeros((), jnp.int32)
    if strategy == "dense":
        y = moe_dense(x, routing, weights)
    elif strategy == "gather":
        y = moe_gather(x, routing, weights)
    elif strategy == "sorted":
        y = moe_sorted(x, routing, valid, weights)
    elif strategy == "ragged":
        y = moe_ragged(x, routing, valid, weights)
    elif strategy == "blocked":
        y = moe_blocked(x, routing, valid, weights)
    elif strategy == "kernel":
        y = moe_kernel(x, routing, valid, weights)
    else:
        y, dropped = moe_einsum(x, routing, valid, weights, group_size=group_size,
                                capacity_factor=capacity_factor, mesh=mesh)
    return y, routing.logits, dropped
