"""Hugging Face Mixtral checkpoints: the key table, and reading/writing it tensor by tensor.

PyTorch linear weights are [out, in]; the canonical layout is x @ W, so every matrix but the
embedding is transposed and its head axes split out (see mixtral_jax.model for the layout).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterator

import numpy as np

from mixtral_jax.model import param_specs

from .errors import CheckpointError
from .safetensors_io import SafetensorsFile, write_safetensors

GLOBAL_KEYS = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}
LAYER_KEYS = {
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "wq": "model.layers.{i}.self_attn.q_proj.weight",
    "wk": "model.layers.{i}.self_attn.k_proj.weight",
    "wv": "model.layers.{i}.self_attn.v_proj.weight",
    "wo": "model.layers.{i}.self_attn.o_proj.weight",
    "router": "model.layers.{i}.block_sparse_moe.gate.weight",
}
EXPERT_KEYS = {  # one [F, D] or [D, F] matrix per expert j
    "w_gate": "model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight",
    "w_up": "model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight",
    "w_down": "model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight",
}
# transformers 5.x in-memory names (also accepted on read).
FUSED_KEYS = {
    "router": "model.layers.{i}.mlp.gate.weight",
    "gate_up": "model.layers.{i}.mlp.experts.gate_up_proj",   # [E, 2F, D]: rows [:F] w1, [F:] w3
    "down": "model.layers.{i}.mlp.experts.down_proj",         # [E, D, F] (w2)
}


def torch_shapes(config) -> dict[str, tuple[int, ...]]:
    """Shape of each leaf in PyTorch [out, in] orientation (per expert for expert weights)."""
    c = config
    d, v = c.d_model, c.vocab_size
    return {
        "embed": (v, d), "final_norm": (d,), "lm_head": (v, d), "attn_norm": (d,), "ffn_norm": (d,),
        "wq": (c.n_heads * c.head_dim, d), "wk": (c.n_kv_heads * c.head_dim, d),
        "wv": (c.n_kv_heads * c.head_dim, d), "wo": (d, c.n_heads * c.head_dim),
        "router": (c.n_experts, d), "w_gate": (c.d_ff, d), "w_up": (c.d_ff, d), "w_down": (d, c.d_ff),
    }


def to_canonical(leaf: str, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """PyTorch orientation -> canonical: transpose matrices (not the embedding), split head axes."""
    if a.ndim == 1 or leaf == "embed":
        return a
    return np.ascontiguousarray(a.T).reshape(shape)


def to_torch(leaf: str, a: np.ndarray, torch_shape: tuple[int, ...]) -> np.ndarray:
    """Canonical -> PyTorch orientation (inverse of `to_canonical`)."""
    if a.ndim == 1 or leaf == "embed":
        return a
    return np.ascontiguousarray(a.reshape(torch_shape[::-1]).T)


class TensorSource:
    """The tensors of several safetensors files as one mapping; tracks which keys were used."""

    def __init__(self, files: list[SafetensorsFile]):
        self._where: dict[str, SafetensorsFile] = {}
        for f in files:
            for k in f.keys():
                if k in self._where:
                    raise CheckpointError(f"{f.path}: key {k!r} also found in {self._where[k].path}")
                self._where[k] = f
        self._used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def nbytes(self) -> int:
        return sum(f.nbytes(k) for k, f in self._where.items())

    def take(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        """Read `key`, checking its shape; each key may be taken once."""
        if key not in self._where:
            raise CheckpointError(f"missing tensor {key!r}")
        f = self._where[key]
        if key in self._used:
            raise CheckpointError(f"{f.path}: tensor {key!r} used twice")
        if f.shape(key) != tuple(shape):
            raise CheckpointError(f"{f.path}: {key!r} has shape {list(f.shape(key))}, the config "
                                  f"implies {list(shape)}")
        self._used.add(key)
        return f.read(key)

    def check_all_used(self) -> None:
        unused = sorted(set(self._where) - self._used)
        if unused:
            f = self._where[unused[0]]
            more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
            raise CheckpointError(f"{f.path}: unexpected tensor {unused[0]!r}{more}")


def open_hf_folder(path: str) -> TensorSource:
    """The safetensors of an HF folder: per the index when present, else every *.safetensors."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index}: not a valid safetensors index") from None
        for name in names:
            if not os.path.isfile(os.path.join(path, name)):
                raise CheckpointError(f"{os.path.join(path, name)}: shard listed in the index is missing")
        source = TensorSource([SafetensorsFile(os.path.join(path, n)) for n in names])
        for key, name in weight_map.items():
            if key not in source:
                raise CheckpointError(f"{os.path.join(path, name)}: tensor {key!r} listed in the index "
                                      "is not in the shard")
        return source
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    return TensorSource([SafetensorsFile(f) for f in files])


def read_hf_layer(config, source: TensorSource, i: int) -> dict[str, np.ndarray]:
    """Layer i's canonical leaves (source dtype), from per-expert or fused expert names."""
    specs = param_specs(config)[f"layers_{i}"]
    ts = torch_shapes(config)
    out = {}
    fused = FUSED_KEYS["gate_up"].format(i=i) in source
    for leaf, key in LAYER_KEYS.items():
        if leaf == "router" and fused:
            key = FUSED_KEYS["router"]
        out[leaf] = to_canonical(leaf, source.take(key.format(i=i), ts[leaf]), specs[leaf].shape)
    e, d, f = config.n_experts, config.d_model, config.d_ff
    if fused:
        gate_up = source.take(FUSED_KEYS["gate_up"].format(i=i), (e, 2 * f, d))
        out["w_gate"] = np.ascontiguousarray(gate_up[:, :f].transpose(0, 2, 1))
        out["w_up"] = np.ascontiguousarray(gate_up[:, f:].transpose(0, 2, 1))
        out["w_down"] = np.ascontiguousarray(
            source.take(FUSED_KEYS["down"].format(i=i), (e, d, f)).transpose(0, 2, 1))
    else:
        for leaf, key in EXPERT_KEYS.items():
            out[leaf] = np.stack([to_canonical(leaf, source.take(key.format(i=i, j=j), ts[leaf]),
                                               specs[leaf].shape[1:]) for j in range(e)])
    return out


def read_hf_globals(config, source: TensorSource) -> dict[str, np.ndarray]:
    """embed, final_norm and lm_head in canonical layout."""
    specs, ts = param_specs(config), torch_shapes(config)
    return {leaf: to_canonical(leaf, source.take(key, ts[leaf]), specs[leaf].shape)
            for leaf, key in GLOBAL_KEYS.items()}


def iter_hf_params(config, source: TensorSource) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """(name, leaves) for the globals then each layer; checks every key was used at the end."""
    yield "globals", read_hf_globals(config, source)
    for i in range(config.n_layers):
        yield f"layers_{i}", read_hf_layer(config, source, i)
    source.check_all_used()


def read_hf_params(config, path: str, convert_leaf=lambda a: a) -> dict[str, Any]:
    """All parameters of an HF folder in the canonical nested layout.

    Args:
      config: the model config (from the folder's config.json).
      path: the folder.
      convert_leaf: applied to each numpy leaf as it is read (e.g. cast and move to device).
    """
    params: dict[str, Any] = {}
    for name, leaves in iter_hf_params(config, open_hf_folder(path)):
        leaves = {k: convert_leaf(v) for k, v in leaves.items()}
        if name == "globals":
            params.update(leaves)
        else:
            params[name] = leaves
    return params


def hf_layer_tensors(config, layer: dict[str, Any], i: int) -> dict[str, np.ndarray]:
    """Layer i's tensors under HF per-expert names (what transformers' save_pretrained writes)."""
    ts = torch_shapes(config)
    out = {LAYER_KEYS[leaf].format(i=i): to_torch(leaf, np.asarray(layer[leaf]), ts[leaf])
           for leaf in LAYER_KEYS}
    for leaf, key in EXPERT_KEYS.items():
        stacked = np.asarray(layer[leaf])
        for j in range(config.n_experts):
            out[key.format(i=i, j=j)] = to_torch(leaf, stacked[j], ts[leaf])
    return out


def write_hf(path: str, config, params: dict[str, Any]) -> None:
    """Write an HF folder: one safetensors shard per layer plus one for the rest, the index, and
    a transformers 5.x config.json. `path` must exist and be empty."""
    n = config.n_layers + 1
    shard = "model-{:05d}-of-{:05d}.safetensors".format
    ts = torch_shapes(config)
    weight_map: dict[str, str] = {}
    total = 0
    for k in range(n):
        if k == 0:
            tensors = {GLOBAL_KEYS[leaf]: to_torch(leaf, np.asarray(params[leaf]), ts[leaf])
                       for leaf in GLOBAL_KEYS}
        else:
            tensors = hf_layer_tensors(config, params[f"layers_{k - 1}"], k - 1)
        write_safetensors(os.path.join(path, shard(k + 1, n)), tensors, {"format": "pt"})
        weight_map.update({name: shard(k + 1, n) for name in tensors})
        total += sum(a.nbytes for a in tensors.values())
    dtype = np.asarray(params["embed"]).dtype
    hf_config = dict(config.to_hf(), dtype=str(dtype))
    with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                  f, indent=2)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)
