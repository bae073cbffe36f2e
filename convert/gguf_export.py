"""Project checkpoint -> one GGUF file (llama.cpp's format), with the tokenizer.

GGUF has no Mixtral architecture of its own: llama.cpp reads Mixtral as `llama` with experts, the
way its `convert_hf_to_gguf.py` writes it. Its key table, from our canonical leaves:

| canonical leaf | GGUF tensor | numpy shape written (GGUF lists dims reversed) |
|---|---|---|
| embed | token_embd.weight | [V, D] |
| final_norm | output_norm.weight | [D] |
| lm_head | output.weight | [V, D] |
| attn_norm, ffn_norm | blk.{i}.attn_norm.weight, blk.{i}.ffn_norm.weight | [D] |
| wq, wk | blk.{i}.attn_q.weight, blk.{i}.attn_k.weight | [N·H, D], [K·H, D], rows in interleaved-pair RoPE order (Mistral's: GGML's "normal" RoPE) |
| wv, wo | blk.{i}.attn_v.weight, blk.{i}.attn_output.weight | [K·H, D], [D, N·H] |
| router | blk.{i}.ffn_gate_inp.weight | [E, D] |
| w_gate, w_up, w_down | blk.{i}.ffn_gate_exps.weight, ffn_up_exps, ffn_down_exps | [E, F, D], [E, F, D], [E, D, F] |

Types (`gguf_type`): f32 everything; f16 the matrices; q8_0 the matrices whose rows are a whole
number of 32-value blocks (others f16). Norms and the router stay f32 in every type, as llama.cpp's
converter keeps them. An int8 checkpoint is dequantised and re-quantized: to q8_0 that is a second
rounding (per 32-value block instead of per channel), not a copy of its int8 values.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from mixtral_jax.checkpoint import TOKENIZER_FILE, item_names, resolve_dtype, restore_item
from mixtral_jax.config import MixtralConfig
from mixtral_jax.quant import dequantize

from .convert import project_manifest
from .errors import CheckpointError
from .formats import export_keys, export_tensor

log = logging.getLogger(__name__)

GGUF_TYPES = ("f32", "f16", "q8_0")
ARCH = "llama"
Q8_BLOCK = 32

GLOBALS = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}
LAYER = {"attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
         "wo": "attn_output", "router": "ffn_gate_inp", "w_gate": "ffn_gate_exps", "w_up": "ffn_up_exps",
         "w_down": "ffn_down_exps"}
ALWAYS_F32 = ("norm", "ffn_gate_inp")  # name parts of tensors kept float32 in every type


def gguf_tensors(config: MixtralConfig, item: str, leaves: dict[str, np.ndarray]):
    """(GGUF name, float32 array in PyTorch orientation) for one item's canonical leaves.

    Everything but the experts is the Mistral export's tensor (`export_tensor`: PyTorch
    orientation, q/k rows interleaved, as GGML's RoPE wants); the experts are stacked per layer."""
    i = None if item == "globals" else int(item.split("_")[1])
    dense = {leaf: np.asarray(dequantize(w, np.float32), np.float32) for leaf, w in leaves.items()}
    names = GLOBALS if i is None else {leaf: f"blk.{i}.{part}.weight" for leaf, part in LAYER.items()}
    for _, shape, entry, _ in export_keys(config, "mistral", i):
        if entry.kind != "per_expert":
            yield names[entry.leaves[0]], export_tensor(config, dense, shape, entry, None)
    if i is not None:
        for leaf in ("w_gate", "w_up", "w_down"):       # canonical [E, in, out] -> [E, out, in]
            yield names[leaf], np.ascontiguousarray(dense[leaf].transpose(0, 2, 1))


def tensor_type(name: str, a: np.ndarray, gguf_type: str) -> str:
    """The type one tensor is written in."""
    if gguf_type == "f32" or a.ndim == 1 or any(p in name for p in ALWAYS_F32):
        return "f32"
    if gguf_type == "q8_0" and a.shape[-1] % Q8_BLOCK == 0:
        return "q8_0"
    return "f16"


def export_gguf(ckpt: str, out: str, *, gguf_type: str = "f32") -> dict:
    """Write `out` (a new .gguf file; written beside it under a temporary name, then renamed).

    Returns:
      {"tensors", "bytes", "types": {type: count}, "requantized": bool}.
    """
    import gguf
    import sentencepiece as spm

    if gguf_type not in GGUF_TYPES:
        raise CheckpointError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    manifest = project_manifest(os.fspath(ckpt))
    config = manifest["config"]
    if config.sliding_window is not None:
        raise CheckpointError(f"{ckpt}: sliding_window={config.sliding_window}; llama.cpp's llama "
                              "architecture has no sliding window")
    tokenizer = os.path.join(ckpt, TOKENIZER_FILE)
    if not os.path.isfile(tokenizer):
        raise CheckpointError(f"{ckpt}: no {TOKENIZER_FILE}; a GGUF file carries its tokenizer")
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    if sp.get_piece_size() != config.vocab_size:
        raise CheckpointError(f"{ckpt}: the tokenizer has {sp.get_piece_size()} pieces, the model "
                              f"{config.vocab_size}")
    if os.path.exists(out):
        raise CheckpointError(f"{out}: already exists")
    quantized = manifest.get("quantize")
    dt = np.dtype(resolve_dtype(manifest["dtype"]))

    tmp = f"{out}.tmp-{os.getpid()}"
    writer = gguf.GGUFWriter(tmp, ARCH)
    try:
        _write_metadata(writer, config, sp, gguf_type, os.path.basename(os.path.normpath(ckpt)))
        counts: dict[str, int] = {}
        for item in item_names(config):
            leaves = restore_item(ckpt, config, item, dt, quantized=quantized)
            for name, t in gguf_tensors(config, item, leaves):
                kind = tensor_type(name, t, gguf_type)
                counts[kind] = counts.get(kind, 0) + 1
                if kind == "q8_0":
                    q = gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0)
                    writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                else:
                    writer.add_tensor(name, t.astype(np.float32 if kind == "f32" else np.float16))
            log.info("gguf: %s written", item)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return {"tensors": sum(counts.values()), "bytes": os.path.getsize(out), "types": counts,
            "requantized": bool(quantized) and gguf_type == "q8_0"}


def _write_metadata(writer, config: MixtralConfig, sp, gguf_type: str, name: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.d_ff)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_expert_count(config.n_experts)
    writer.add_expert_used_count(config.top_k)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        types.append(gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                     else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.UNUSED if sp.is_unused(i)
                     else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
