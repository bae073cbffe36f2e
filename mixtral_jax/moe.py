"""The sparse mixture-of-experts layer: a float32 top-k router and interchangeable dispatch strategies.

Every strategy computes y = sum_{e in top-k(x)} g_e(x) * w_down_e(silu(x w_gate_e) * (x w_up_e)),
exactly (no dropped tokens unless a capacity factor is asked for):

- `dense`: every expert on every token, weighted by the (mostly zero) gates. The test oracle.
- `gather`: reads only the selected experts' weights, one copy per (token, slot). For decode.
- `einsum`: GShard dispatch/combine one-hot einsums over bounded routing groups with an expert
  capacity C; the expert axis of the dispatched activations is what expert parallelism shards.

Einsum alphabet: T tokens (flattened batch), D d_model, F ffw, E experts, X top-k slot,
g routing group, t token within a group, c capacity slot.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .sharding import constrain, experts_split, token_group_multiple

STRATEGIES = ("auto", "dense", "gather", "einsum")
DEFAULT_GROUP_SIZE = 512


class Routing(NamedTuple):
    """Router output for T tokens."""
    logits: jax.Array   # [T, E] float32
    weights: jax.Array  # [T, X] float32, sums to 1 per token
    experts: jax.Array  # [T, X] int32, ties broken toward the lower expert index


def route(x: jax.Array, router: jax.Array, top_k: int) -> Routing:
    """Top-k routing in float32: softmax over the k largest logits.

    This equals HF's softmax over all experts, top-k, renormalise (the tests check it).

    Args:
      x: [T, D] activations.
      router: [D, E] router weights.
      top_k: experts per token.
    Returns:
      Routing with logits [T, E], weights [T, X], experts [T, X].
    """
    logits = jnp.einsum("td,de->te", x.astype(jnp.float32), router.astype(jnp.float32))  # [T, E]
    top_logits, experts = jax.lax.top_k(logits, top_k)  # lax.top_k keeps the lower index on ties
    return Routing(logits, jax.nn.softmax(top_logits, axis=-1), experts.astype(jnp.int32))


def _swiglu(x, w_gate, w_up, w_down, spec_in: str, spec_out: str):
    """SwiGLU with einsum specs, e.g. ('td,edf->tef', 'tef,efd->ted')."""
    h = jax.nn.silu(jnp.einsum(spec_in, x, w_gate)) * jnp.einsum(spec_in, x, w_up)
    return jnp.einsum(spec_out, h, w_down)


def moe_dense(x, routing: Routing, w_gate, w_up, w_down) -> jax.Array:
    """Oracle: all E experts on all T tokens. x [T, D]; w_gate/w_up [E, D, F]; w_down [E, F, D]."""
    n_experts = w_gate.shape[0]
    gates = jnp.einsum("tx,txe->te", routing.weights,
                       jax.nn.one_hot(routing.experts, n_experts, dtype=jnp.float32))  # [T, E]
    out = _swiglu(x, w_gate, w_up, w_down, "td,edf->tef", "tef,efd->ted")  # [T, E, D]
    return jnp.einsum("te,ted->td", gates, out.astype(jnp.float32)).astype(x.dtype)


def moe_gather(x, routing: Routing, w_gate, w_up, w_down) -> jax.Array:
    """Reads only the selected experts' weights: [T, X] gathered copies of [D, F] matrices."""
    idx = routing.experts
    out = _swiglu(x, w_gate[idx], w_up[idx], w_down[idx], "td,txdf->txf", "txf,txfd->txd")  # [T,X,D]
    return jnp.einsum("tx,txd->td", routing.weights, out.astype(jnp.float32)).astype(x.dtype)


def einsum_capacity(group_size: int, n_experts: int, top_k: int, capacity_factor: float | None) -> int:
    """Expert capacity C per routing group; None means dropless (C = group size)."""
    if capacity_factor is None:
        return group_size  # a token picks an expert at most once, so no expert gets more than G
    return max(1, min(group_size, math.ceil(capacity_factor * group_size * top_k / n_experts)))


def moe_einsum(x, routing: Routing, valid, w_gate, w_up, w_down, *,
               group_size: int = DEFAULT_GROUP_SIZE, capacity_factor: float | None = None, mesh=None):
    """GShard dispatch/combine over routing groups of at most `group_size` tokens.

    Within a group, all first choices are placed before any second choice (GShard's priority), each
    expert keeps the first C assignments, and later ones are dropped and counted.

    Args:
      x: [T, D]; valid: [T] bool (padding tokens take no capacity); weights as in `moe_dense`.
      group_size: routing group bound; keeps the one-hot einsums' cost at 2G/(3F) of the experts'.
      capacity_factor: None for dropless, else C = ceil(cf * G * top_k / E).
      mesh: when given, groups are split over the mesh before dispatch and experts after it
        (logical axes "token_groups" and "groups"/"experts"), which makes the all-to-all.
    Returns:
      (y [T, D], dropped: int32 count of (token, slot) assignments that were dropped).
    """
    n_tokens, d = x.shape
    n_experts = w_gate.shape[0]
    split = token_group_multiple(mesh)
    g_size = max(1, min(group_size, -(-n_tokens // split)))
    n_groups = -(-n_tokens // (g_size * split)) * split
    pad = n_groups * g_size - n_tokens
    capacity = einsum_capacity(g_size, n_experts, routing.experts.shape[-1], capacity_factor)

    def grouped(a):
        return jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(n_groups, g_size, *a.shape[1:])

    xg = constrain(grouped(x), ("token_groups", None, "embed"), mesh)  # [g, t, D]
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

    expert_axes = ("groups", "experts", "capacity", "embed")
    expert_in = jnp.einsum("gtec,gtd->gecd", dispatch.astype(x.dtype), xg)  # [g, E, c, D]
    expert_in = constrain(expert_in, expert_axes, mesh)
    expert_out = _swiglu(expert_in, w_gate, w_up, w_down, "gecd,edf->gecf", "gecf,efd->gecd")
    expert_out = constrain(expert_out, expert_axes, mesh)                   # [g, E, c, D]
    y = jnp.einsum("gtec,gecd->gtd", combine, expert_out.astype(jnp.float32))  # [g, t, D]
    y = constrain(y, ("token_groups", None, "embed"), mesh)
    return y.reshape(-1, d)[:n_tokens].astype(x.dtype), dropped.astype(jnp.int32)


def choose_strategy(n_tokens: int, n_experts: int, top_k: int, mesh=None) -> str:
    """`auto`: gather when the selected experts are fewer than all experts (decode) and the
    experts are not split across devices, else einsum."""
    return "gather" if n_tokens * top_k < n_experts and not experts_split(mesh) else "einsum"


def moe(x, layer, *, top_k: int, valid=None, strategy: str = "auto",
        capacity_factor: float | None = None, group_size: int = DEFAULT_GROUP_SIZE, mesh=None):
    """The MoE layer over flattened tokens.

    Args:
      x: [T, D] activations.
      layer: a layer's parameters with `router` [D, E], `w_gate`/`w_up` [E, D, F], `w_down` [E, F, D].
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
    routing = route(x, layer["router"], top_k)
    weights = (layer["w_gate"], layer["w_up"], layer["w_down"])
    if strategy == "auto":
        strategy = choose_strategy(x.shape[0], layer["w_gate"].shape[0], top_k, mesh)
    dropped = jnp.zeros((), jnp.int32)
    if strategy == "dense":
        y = moe_dense(x, routing, *weights)
    elif strategy == "gather":
        y = moe_gather(x, routing, *weights)
    else:
        if valid is None:
            valid = jnp.ones(x.shape[:1], bool)
        y, dropped = moe_einsum(x, routing, valid, *weights, group_size=group_size,
                                capacity_factor=capacity_factor, mesh=mesh)
    return y, routing.logits, dropped
