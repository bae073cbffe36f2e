"""The key tables: where each canonical leaf lives in Hugging Face and Mistral checkpoints.

PyTorch linear weights are [out, in]; the canonical layout (mixtral_jax.model) is x @ W, so every
matrix but the embedding is transposed and its head axes split out. Mistral's original q/k rows
are in interleaved-pair RoPE order; HF's (and ours) are in rotate-half order (`permute_qk`).

A layer's experts come in one of several layouts, told apart by which keys the source holds:
per-expert matrices (both formats' `save` output), transformers 5.x fused tensors, and the
original torrent release's stacked [E·F, D] tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from mixtral_jax.model import param_specs


class Entry(NamedTuple):
    """Source tensors that make some canonical leaves of one layer (or of the globals)."""
    leaves: tuple[str, ...]   # canonical leaf names it fills
    key: str                  # key template: {i} layer, {j} expert
    kind: str                 # how to assemble, see `assemble`


HF_GLOBALS = (
    Entry(("embed",), "model.embed_tokens.weight", "plain"),
    Entry(("final_norm",), "model.norm.weight", "plain"),
    Entry(("lm_head",), "lm_head.weight", "plain"),
)
HF_ATTENTION = (
    Entry(("attn_norm",), "model.layers.{i}.input_layernorm.weight", "plain"),
    Entry(("ffn_norm",), "model.layers.{i}.post_attention_layernorm.weight", "plain"),
    Entry(("wq",), "model.layers.{i}.self_attn.q_proj.weight", "plain"),
    Entry(("wk",), "model.layers.{i}.self_attn.k_proj.weight", "plain"),
    Entry(("wv",), "model.layers.{i}.self_attn.v_proj.weight", "plain"),
    Entry(("wo",), "model.layers.{i}.self_attn.o_proj.weight", "plain"),
)
HF_EXPERTS = {
    "per_expert": (
        Entry(("router",), "model.layers.{i}.block_sparse_moe.gate.weight", "plain"),
        Entry(("w_gate",), "model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight", "per_expert"),
        Entry(("w_up",), "model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight", "per_expert"),
        Entry(("w_down",), "model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight", "per_expert"),
    ),
    "fused": (  # transformers 5.x in-memory names
        Entry(("router",), "model.layers.{i}.mlp.gate.weight", "plain"),
        Entry(("w_gate", "w_up"), "model.layers.{i}.mlp.experts.gate_up_proj", "fused_gate_up"),
        Entry(("w_down",), "model.layers.{i}.mlp.experts.down_proj", "fused_down"),
    ),
}

MISTRAL_GLOBALS = (
    Entry(("embed",), "tok_embeddings.weight", "plain"),
    Entry(("final_norm",), "norm.weight", "plain"),
    Entry(("lm_head",), "output.weight", "plain"),
)
MISTRAL_ATTENTION = (
    Entry(("attn_norm",), "layers.{i}.attention_norm.weight", "plain"),
    Entry(("ffn_norm",), "layers.{i}.ffn_norm.weight", "plain"),
    Entry(("wq",), "layers.{i}.attention.wq.weight", "interleaved_qk"),
    Entry(("wk",), "layers.{i}.attention.wk.weight", "interleaved_qk"),
    Entry(("wv",), "layers.{i}.attention.wv.weight", "plain"),
    Entry(("wo",), "layers.{i}.attention.wo.weight", "plain"),
)
MISTRAL_EXPERTS = {
    "per_expert": (
        Entry(("router",), "layers.{i}.feed_forward.gate.weight", "plain"),
        Entry(("w_gate",), "layers.{i}.feed_forward.experts.{j}.w1.weight", "per_expert"),
        Entry(("w_up",), "layers.{i}.feed_forward.experts.{j}.w3.weight", "per_expert"),
        Entry(("w_down",), "layers.{i}.feed_forward.experts.{j}.w2.weight", "per_expert"),
    ),
    "stacked": (  # the original torrent release
        Entry(("router",), "layers.{i}.block_sparse_moe.gate.weight", "plain"),
        Entry(("w_gate",), "layers.{i}.block_sparse_moe.w1", "stacked"),
        Entry(("w_up",), "layers.{i}.block_sparse_moe.w3", "stacked"),
        Entry(("w_down",), "layers.{i}.block_sparse_moe.w2", "stacked_down"),
    ),
}

FORMATS = {
    "hf": (HF_GLOBALS, HF_ATTENTION, HF_EXPERTS),
    "mistral": (MISTRAL_GLOBALS, MISTRAL_ATTENTION, MISTRAL_EXPERTS),
}


def torch_shape(config, leaf: str) -> tuple[int, ...]:
    """Shape of a leaf in PyTorch [out, in] orientation (one expert's, for expert weights)."""
    c = config
    return {
        "embed": (c.vocab_size, c.d_model), "lm_head": (c.vocab_size, c.d_model),
        "final_norm": (c.d_model,), "attn_norm": (c.d_model,), "ffn_norm": (c.d_model,),
        "wq": (c.n_heads * c.head_dim, c.d_model), "wk": (c.n_kv_heads * c.head_dim, c.d_model),
        "wv": (c.n_kv_heads * c.head_dim, c.d_model), "wo": (c.d_model, c.n_heads * c.head_dim),
        "router": (c.n_experts, c.d_model), "w_gate": (c.d_ff, c.d_model),
        "w_up": (c.d_ff, c.d_model), "w_down": (c.d_model, c.d_ff),
    }[leaf]


def entry_keys(config, entry: Entry, i: int | None) -> dict[str, tuple[int, ...]]:
    """The source keys an entry reads, with the shape each must have."""
    e, f, d = config.n_experts, config.d_ff, config.d_model
    leaf = entry.leaves[0]
    if entry.kind == "per_expert":
        return {entry.key.format(i=i, j=j): torch_shape(config, leaf) for j in range(e)}
    shape = {"fused_gate_up": (e, 2 * f, d), "fused_down": (e, d, f), "stacked": (e * f, d),
             "stacked_down": (e * f, d)}.get(entry.kind, torch_shape(config, leaf))
    return {entry.key.format(i=i): shape}


def layer_entries(fmt: str, layout: str) -> tuple[Entry, ...]:
    _, attention, experts = FORMATS[fmt]
    return attention + experts[layout]


def detect_layout(fmt: str, has_key, i: int) -> str:
    """Which expert layout layer i uses: the first whose first expert key the source holds."""
    experts = FORMATS[fmt][2]
    for layout, entries in experts.items():
        if has_key(entries[1].key.format(i=i, j=0)):
            return layout
    return next(iter(experts))  # report the missing keys of the standard layout


def n_heads_of(config, leaf: str) -> int:
    return config.n_heads if leaf == "wq" else config.n_kv_heads


def permute_qk(w: np.ndarray, n_heads: int, inverse: bool = False) -> np.ndarray:
    """Mistral interleaved-pair RoPE rows -> HF rotate-half rows, per head (inverse: back).

    w: [n_heads * H, D] in PyTorch orientation.
    """
    rows, d = w.shape
    h = rows // n_heads
    if inverse:
        return w.reshape(n_heads, 2, h // 2, d).transpose(0, 2, 1, 3).reshape(rows, d)
    return w.reshape(n_heads, h // 2, 2, d).transpose(0, 2, 1, 3).reshape(rows, d)


def to_canonical(leaf: str, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """One tensor in PyTorch orientation -> canonical: transpose matrices but the embedding."""
    if a.ndim == 1 or leaf == "embed":
        return a
    return np.ascontiguousarray(a.T).reshape(shape)


def to_torch(leaf: str, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `to_canonical`; `shape` is the PyTorch shape."""
    if a.ndim == 1 or leaf == "embed":
        return a
    return np.ascontiguousarray(a.reshape(shape[::-1]).T)


def assemble(config, entry: Entry, read, keys: list[str], i: int | None) -> dict[str, np.ndarray]:
    """Canonical leaves from the entry's source tensors.

    Args:
      read: reads one source key into a numpy array (called once per key, one at a time, so
        per-expert weights are never all held twice).
      keys: the entry's keys, in `entry_keys` order.
      i: the layer, or None for the globals.
    """
    specs = param_specs(config) if i is None else param_specs(config)[f"layers_{i}"]
    leaf = entry.leaves[0]
    shape = specs[leaf].shape
    e, f = config.n_experts, config.d_ff
    if entry.kind == "per_expert":
        out = None
        for j, key in enumerate(keys):
            a = read(key)
            out = np.empty(shape, a.dtype) if out is None else out
            out[j] = a.T
        return {leaf: out}
    a = read(keys[0])
    if entry.kind == "plain":
        return {leaf: to_canonical(leaf, a, shape)}
    if entry.kind == "interleaved_qk":
        return {leaf: to_canonical(leaf, permute_qk(a, n_heads_of(config, leaf)), shape)}
    if entry.kind == "fused_gate_up":  # [E, 2F, D]: rows [:F] gate (w1), [F:] up (w3)
        return {"w_gate": np.ascontiguousarray(a[:, :f].transpose(0, 2, 1)),
                "w_up": np.ascontiguousarray(a[:, f:].transpose(0, 2, 1))}
    if entry.kind == "fused_down":     # [E, D, F]
        return {leaf: np.ascontiguousarray(a.transpose(0, 2, 1))}
    if entry.kind == "stacked":        # [E·F, D], expert e in rows e·F:(e+1)·F
        return {leaf: np.ascontiguousarray(a.reshape(e, f, -1).transpose(0, 2, 1))}
    if entry.kind == "stacked_down":   # [E·F, D]: each slice is w2ᵀ already, i.e. canonical [F, D]
        return {leaf: a.reshape(e, f, -1)}
    raise AssertionError(entry.kind)


def export_keys(config, fmt: str, i: int | None) -> list[tuple[str, tuple[int, ...], Entry, int | None]]:
    """(key, PyTorch shape, entry, expert j) of every tensor the format writes for the globals
    (i None) or layer i, in file order. Experts are written per expert, as both formats save."""
    globals_, attention, experts = FORMATS[fmt]
    out = []
    for entry in (globals_ if i is None else attention + experts["per_expert"]):
        shape = torch_shape(config, entry.leaves[0])
        if entry.kind == "per_expert":
            out += [(entry.key.format(i=i, j=j), shape, entry, j) for j in range(config.n_experts)]
        else:
            out.append((entry.key.format(i=i), shape, entry, None))
    return out


def export_tensor(config, leaves: dict[str, np.ndarray], shape, entry: Entry, j: int | None) -> np.ndarray:
    """One tensor of `export_keys` from canonical leaves."""
    leaf = entry.leaves[0]
    a = np.asarray(leaves[leaf])
    t = to_torch(leaf, a if j is None else a[j], shape)
    if entry.kind == "interleaved_qk":
        t = np.ascontiguousarray(permute_qk(t, n_heads_of(config, leaf), inverse=True))
    return t
