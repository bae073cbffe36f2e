"""LoRA adapters (Hu et al., 2021): W x + (alpha / r) · B A x on chosen matrices.

Targets: "q", "k", "v", "o" (the attention projections wq, wk, wv, wo) and "experts" (w_gate,
w_up and w_down of every expert, one adapter per expert). For a weight seen as [in, out] (x @ W
orientation, its head axes flattened), the adapter is a [in, r] and b [r, out]; experts carry an
[E] axis in front. `a` starts uniform in ±1/sqrt(in) (PEFT's Kaiming-uniform bound), `b` at zero,
so a fresh adapter leaves the model unchanged.

Layout: an adapter is `{"layers_{i}": {weight name: {"a", "b"}}}`. `attach` puts each layer's
entry, with its scale, into the parameter tree under the layer's "lora" key; the decoder layer
adds (alpha / r) · a @ b to the weight when it runs (`apply_to_layer`), so the base weights stay
untouched, only one layer's delta exists at a time, and gradients reach only the adapter when
only the adapter is differentiated. `merge` folds the adapter into the weights for good.

On disk (`save_adapter`): a folder with `adapter.json` ({"rank", "alpha", "targets", "format"})
and `params/`, an orbax checkpoint of the adapter tree in float32.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp

from .config import MixtralConfig
from .kvcache import layer_name

TARGETS = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "experts": ("w_gate", "w_up", "w_down")}
ADAPTER_JSON = "adapter.json"
FORMAT = "mixtral_jax.lora.v1"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (the update is scaled by alpha / r) and the targets (see the module docstring)."""
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "k", "v", "o")

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets must be among {', '.join(TARGETS)}, got {','.join(self.targets)!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def weights(self) -> tuple[str, ...]:
        """The parameter names adapted, e.g. ("wq", "wv")."""
        out: list[str] = []
        for t in self.targets:
            out += [TARGETS[t]] if isinstance(TARGETS[t], str) else list(TARGETS[t])
        return tuple(out)


def parse_targets(text: str) -> tuple[str, ...]:
    """'q,k,v,o,experts' -> ("q", "k", "v", "o", "experts") (checked by LoraConfig)."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _in_out(config: MixtralConfig, name: str) -> tuple[int, int]:
    c = config
    return {"wq": (c.d_model, c.n_heads * c.head_dim), "wk": (c.d_model, c.n_kv_heads * c.head_dim),
            "wv": (c.d_model, c.n_kv_heads * c.head_dim), "wo": (c.n_heads * c.head_dim, c.d_model),
            "w_gate": (c.d_model, c.d_ff), "w_up": (c.d_model, c.d_ff), "w_down": (c.d_ff, c.d_model)}[name]


def init_adapter(config: MixtralConfig, lora: LoraConfig, seed: int = 0) -> dict[str, Any]:
    """A fresh float32 adapter: a uniform in ±1/sqrt(in), b zero (the model is unchanged)."""
    key = jax.random.key(seed)
    adapter = {}
    for i in range(config.n_layers):
        layer = {}
        for j, name in enumerate(lora.weights()):
            n_in, n_out = _in_out(config, name)
            lead = (config.n_experts,) if name in TARGETS["experts"] else ()
            bound = 1.0 / math.sqrt(n_in)
            layer[name] = {
                "a": jax.random.uniform(jax.random.fold_in(key, i * 16 + j), (*lead, n_in, lora.rank),
                                        jnp.float32, -bound, bound),
                "b": jnp.zeros((*lead, lora.rank, n_out), jnp.float32)}
        adapter[layer_name(i)] = layer
    return adapter


def attach(params, adapter, lora: LoraConfig):
    """Parameters whose layers carry the adapter (and its scale) under "lora"; `forward`,
    `generate` and training run them unmerged."""
    out = dict(params)
    for name, layer_adapter in adapter.items():
        out[name] = {**params[name], "lora": {"scale": jnp.float32(lora.scale), **layer_adapter}}
    return out


def delta(entry, dtype) -> jax.Array:
    """scale · a @ b, [in, out] (or [E, in, out] per expert)."""
    a, b = entry["a"].astype(dtype), entry["b"].astype(dtype)
    return entry["scale"].astype(dtype) * jnp.einsum("...ir,...ro->...io", a, b)   # [(E,) in, out]


def apply_to_layer(layer: dict[str, Any]) -> dict[str, Any]:
    """A decoder layer's parameters with its "lora" entry added into the weights (identity without
    one). Expert weights may be stacked [E, in, out] or split into E [out, in] matrices, attention
    matrices canonical or the CPU layout's 2-D [out, in] (mixtral_jax.model.split_layer)."""
    if "lora" not in layer:
        return layer
    adapters = layer["lora"]
    out = {k: v for k, v in layer.items() if k != "lora"}
    for name, entry in adapters.items():
        if name == "scale":
            continue
        w = out[name]
        if isinstance(w, dict):
            raise ValueError("LoRA adapters need unquantised weights; load the base model without int8")
        entry = {**entry, "scale": adapters["scale"]}
        if isinstance(w, tuple):  # the CPU split layout: per-expert [out, in]
            d = delta(entry, w[0].dtype)                                           # [E, in, out]
            out[name] = tuple(w_e + d[e].T for e, w_e in enumerate(w))
        elif w.ndim == 2:  # the CPU layout's attention matrix [out, in] (canonical ones are 3-D)
            out[name] = w + delta(entry, w.dtype).T
        else:
            out[name] = w + delta(entry, w.dtype).reshape(w.shape)
    return out


def merge(params, adapter, lora: LoraConfig):
    """The parameters with the adapter folded into the weights (a plain tree `save` writes)."""
    attached = attach(params, adapter, lora)
    return {k: apply_to_layer(v) if k in adapter else v for k, v in attached.items()}


def count_adapter_params(config: MixtralConfig, lora: LoraConfig) -> int:
    total = 0
    for name in lora.weights():
        n_in, n_out = _in_out(config, name)
        total += (config.n_experts if name in TARGETS["experts"] else 1) * lora.rank * (n_in + n_out)
    return total * config.n_layers


def save_adapter(folder: str, adapter, lora: LoraConfig) -> None:
    """Write `folder/adapter.json` and `folder/params` (orbax), replacing an earlier save."""
    import orbax.checkpoint as ocp

    os.makedirs(folder, exist_ok=True)
    path = os.path.abspath(os.path.join(folder, "params"))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), adapter), force=True)
    with open(os.path.join(folder, ADAPTER_JSON), "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets)}, f,
                  indent=1)


def load_adapter(folder: str, config: MixtralConfig) -> tuple[dict[str, Any], LoraConfig]:
    """Read an adapter folder; check it fits `config`.

    Raises:
      FileNotFoundError: no adapter.json; ValueError: a malformed file or an adapter of another shape.
    """
    import orbax.checkpoint as ocp

    meta_path = os.path.join(folder, ADAPTER_JSON)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{folder}: not a LoRA adapter folder (no {ADAPTER_JSON})")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        lora = LoraConfig(rank=meta["rank"], alpha=float(meta["alpha"]), targets=tuple(meta["targets"]))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_path}: malformed adapter description ({e})") from None
    expected = jax.eval_shape(lambda: init_adapter(config, lora))
    path = os.path.abspath(os.path.join(folder, "params"))
    with ocp.StandardCheckpointer() as ckpt:
        stored = ckpt.metadata(path)
        stored = getattr(stored, "item_metadata", stored)  # orbax versions differ
        got = jax.tree.map(lambda a: tuple(a.shape), dict(stored.tree if hasattr(stored, "tree") else stored))
        if got != jax.tree.map(lambda a: tuple(a.shape), expected):
            raise ValueError(f"{folder}: the adapter does not fit this model (rank {lora.rank}, targets "
                             f"{','.join(lora.targets)}; other layer count or widths)")
        adapter = ckpt.restore(path, expected)
    return adapter, lora
