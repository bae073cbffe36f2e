"""Meshes and the one table mapping logical axis names to mesh axes.

This is the only module that names mesh axes. Parameters and large activations carry logical axis
names (mixtral_jax.model.param_specs, the `constrain` calls in the model); `RULES` decides where
each goes. A dimension that the mesh axes do not divide is replicated over them instead (e.g. a
vocabulary of 101 on tensor=2), so every mesh runs every model.

Expert parallelism (GShard): expert weights are split over `expert`; MoE routing groups are split
over `data` x `fsdp` x `expert` before dispatch and over `data` x `fsdp` after it, with the expert
axis of the dispatched activations over `expert`, so XLA moves tokens to their experts with an
all-to-all.

Fully sharded data parallelism (FSDP, ZeRO-3): the `embed` (d_model) dimension of every parameter
is split over `fsdp`, and so are its gradients and optimiser moments (they take the parameters'
shardings); batches are split over `data` x `fsdp`. Activations keep d_model whole (`act_embed`),
so XLA gathers each layer's weights when it runs and reduce-scatters their gradients.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axes (tried together, then fewer, until they divide the dimension)
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),           # parameters' d_model
    "act_embed": (),              # activations' d_model
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "experts": ("expert",),
    "experts_replicated": (),   # the router: tiny, never split
    "ffw": ("tensor",),
    "token_groups": ("data", "fsdp", "expert"),  # MoE routing groups before dispatch / after combine
    "groups": ("data", "fsdp"),                  # routing groups of the dispatched [g, E, C, D] tensor
    "capacity": (),
    "sequence": (),
    "cache_sequence": (),
}


def make_mesh(data: int = 1, expert: int = 1, tensor: int = 1, fsdp: int = 1, *,
              devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, expert, tensor) mesh over the first data*fsdp*expert*tensor devices.

    Args:
      data, expert, tensor, fsdp: axis sizes (positive integers).
      devices: devices to use, default `jax.devices()` (all processes' devices in a multi-host run).
    Raises:
      ValueError: a size below 1, or more devices asked for than exist.
    """
    sizes = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
            raise ValueError(f"mesh axis {name} must be a positive integer, got {size!r}")
    devices = list(jax.devices() if devices is None else devices)
    need = math.prod(sizes.values())
    if need > len(devices):
        described = ", ".join(f"{k}={v}" for k, v in sizes.items())
        raise ValueError(f"mesh {described} needs {need} devices; {len(devices)} available")
    return Mesh(np.asarray(devices[:need]).reshape(*(sizes[a] for a in MESH_AXES)), MESH_AXES)


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,expert=4' -> {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1} (missing axes are 1)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in sizes or not value.strip().isdigit():
            raise ValueError(f"bad mesh {text!r}: expected e.g. data=2,expert=4,tensor=1")
        sizes[name] = int(value)
    return sizes


def axis_sizes(mesh) -> dict[str, int]:
    """Axis name -> size, for a Mesh or a plain dict of sizes (as `plan` uses)."""
    return dict(mesh.shape) if hasattr(mesh, "shape") else dict(mesh)


def spec_for(shape: Sequence[int], axes: Sequence[str | None], mesh) -> PartitionSpec:
    """The PartitionSpec of an array with these logical axes on `mesh` (see RULES)."""
    sizes = axis_sizes(mesh)
    used: set[str] = set()
    parts = []
    for dim, name in zip(shape, axes):
        mesh_axes = [a for a in RULES.get(name, ()) if a in sizes and a not in used] if name else []
        while mesh_axes and dim % math.prod(sizes[a] for a in mesh_axes):
            mesh_axes.pop()
        mesh_axes = [a for a in mesh_axes if sizes[a] > 1]
        used.update(mesh_axes)
        parts.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes))
    return PartitionSpec(*parts)


def sharding_for(shape, axes, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec_for(shape, axes, mesh))


def shard_shape(shape: Sequence[int], axes: Sequence[str | None], mesh) -> tuple[int, ...]:
    """Per-device shape of an array with these logical axes on `mesh` (no devices needed)."""
    sizes = axis_sizes(mesh)
    out = []
    for dim, part in zip(shape, spec_for(shape, axes, mesh)):
        names = () if part is None else (part,) if isinstance(part, str) else part
        out.append(dim // math.prod(sizes[a] for a in names))
    return tuple(out)


def mesh_of(params) -> Mesh | None:
    """The mesh the parameters are laid out on, or None for single-device parameters."""
    leaf = jax.tree.leaves(params)[0]
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
        return sharding.mesh
    return None


def token_group_multiple(mesh: Mesh | None) -> int:
    """How many ways MoE routing groups are split before dispatch (their count is padded to a
    multiple of this so the split is even)."""
    if mesh is None:
        return 1
    sizes = axis_sizes(mesh)
    return math.prod(sizes.get(a, 1) for a in RULES["token_groups"])


def experts_split(mesh: Mesh | None) -> bool:
    """Whether expert weights are split across devices (then only the einsum dispatch keeps them
    in place; gathering selected experts would move weights instead of tokens)."""
    return mesh is not None and math.prod(axis_sizes(mesh).get(a, 1) for a in RULES["experts"]) > 1


def constrain(x: jax.Array, axes: Sequence[str | None], mesh: Mesh | None) -> jax.Array:
    """Sharding constraint by logical axis names; identity without a mesh."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, sharding_for(x.shape, axes, mesh))
