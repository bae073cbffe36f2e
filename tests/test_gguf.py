"""`mixtral-jax export CKPT OUT.gguf --format gguf`: read back with gguf's own reader.

The oracle for the q/k rows is llama.cpp's `convert_hf_to_gguf.py` permutation of HF's q_proj /
k_proj rows (restated here from its formula), applied to the HF layout of our parameters."""

import gguf
import jax
import numpy as np
import pytest
import sentencepiece as spm

import mixtral_jax as mj
from mixtral_jax.checkpoint import param_items, restore_item, save
from mixtral_jax.cli import main
from mixtral_convert import convert, write_folder


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rotate-half rows -> GGML interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    config = mj.MixtralConfig.tiny().replace(vocab_size=32000, n_layers=2)
    params = mj.init_params(config, seed=11)
    path = tmp_path_factory.mktemp("gguf") / "tiny"
    save(str(path), config, params, tokenizer=mj.Tokenizer().path)
    return path, config, jax.tree.map(np.asarray, params)


def export(ckpt, out, *flags):
    return main(["export", str(ckpt), str(out), "--format", "gguf", *flags])


def expected(config, params):
    """GGUF name -> float32 array (numpy shape), from canonical parameters, by HF's layout."""
    d = config.d_model
    out = {"token_embd.weight": params["embed"], "output_norm.weight": params["final_norm"],
           "output.weight": params["lm_head"].T}
    for i in range(config.n_layers):
        p = params[f"layers_{i}"]
        hf_q = p["wq"].reshape(d, -1).T                                  # HF q_proj [N*H, D]
        hf_k = p["wk"].reshape(d, -1).T
        out.update({
            f"blk.{i}.attn_norm.weight": p["attn_norm"], f"blk.{i}.ffn_norm.weight": p["ffn_norm"],
            f"blk.{i}.attn_q.weight": llama_cpp_permute(hf_q, config.n_heads),
            f"blk.{i}.attn_k.weight": llama_cpp_permute(hf_k, config.n_kv_heads),
            f"blk.{i}.attn_v.weight": p["wv"].reshape(d, -1).T,
            f"blk.{i}.attn_output.weight": p["wo"].reshape(-1, d).T,
            f"blk.{i}.ffn_gate_inp.weight": p["router"].T,
            f"blk.{i}.ffn_gate_exps.weight": p["w_gate"].transpose(0, 2, 1),
            f"blk.{i}.ffn_up_exps.weight": p["w_up"].transpose(0, 2, 1),
            f"blk.{i}.ffn_down_exps.weight": p["w_down"].transpose(0, 2, 1),
        })
    return out


def values(t):
    """A reader tensor as float32 in numpy shape (quantized ones dequantized)."""
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.asarray(t.data, np.float32)
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)


def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_export_reads_back_with_names_shapes_types_values_and_tokenizer(model, tmp_path, kind, capsys):
    path, config, params = model
    out = tmp_path / f"tiny-{kind}.gguf"
    assert export(path, out, "--gguf-type", kind) == 0
    assert "gguf" in capsys.readouterr().out
    reader = gguf.GGUFReader(str(out))
    assert field(reader, "general.architecture") == "llama"
    for key, want in {"llama.block_count": config.n_layers, "llama.embedding_length": config.d_model,
                      "llama.feed_forward_length": config.d_ff, "llama.attention.head_count": config.n_heads,
                      "llama.attention.head_count_kv": config.n_kv_heads, "llama.expert_count": config.n_experts,
                      "llama.expert_used_count": config.top_k, "llama.context_length": config.max_seq_len,
                      "llama.rope.dimension_count": config.head_dim}.items():
        assert field(reader, key) == want, key
    assert field(reader, "llama.rope.freq_base") == pytest.approx(config.rope_theta)
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config.norm_eps)
    sp = spm.SentencePieceProcessor(model_file=mj.Tokenizer().path)
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert field(reader, "tokenizer.ggml.model") == "llama" and len(tokens) == config.vocab_size
    assert tokens == [sp.id_to_piece(i) for i in range(sp.get_piece_size())] and tokens[1] == "<s>"
    scores = field(reader, "tokenizer.ggml.scores")
    assert scores[1000] == pytest.approx(sp.get_score(1000))
    types = field(reader, "tokenizer.ggml.token_type")
    assert (types[0], types[1], types[3 + 0x41], types[1000]) == (2, 3, 6, 1)  # unknown, control, byte <0x41>, normal
    assert (field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")) == (1, 2)

    want = expected(config, params)
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(want)
    for name, w in want.items():
        t = got[name]
        assert tuple(int(n) for n in t.shape) == w.shape[::-1], name          # GGUF lists dims reversed
        kept_f32 = w.ndim == 1 or "norm" in name or "gate_inp" in name
        want_type = "F32" if kind == "f32" or kept_f32 else kind.upper()
        assert t.tensor_type.name == want_type, name
        v = values(t).reshape(w.shape)
        if want_type == "F32":
            np.testing.assert_array_equal(v, w.astype(np.float32), err_msg=name)
        elif want_type == "F16":
            np.testing.assert_array_equal(v, w.astype(np.float16).astype(np.float32), err_msg=name)
        else:  # q8_0: per 32 values one float16 scale d = max/127; error <= d/2 + 127 x d's own rounding
            d = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
            err = np.abs(v - w).reshape(-1, 32)
            assert np.all(err <= d * (0.5 + 127 * 2.0 ** -11) + 1e-7), name


def test_int8_checkpoint_requantized_to_q8_0(model, tmp_path, capsys):
    path, config, params = model
    hf = tmp_path / "hf"
    write_folder(str(hf), config, param_items(config, params), "hf", np.float32, tokenizer=mj.Tokenizer().path)
    int8 = tmp_path / "int8"
    convert(str(hf), str(int8), quantize="int8")
    out = tmp_path / "int8.gguf"
    assert export(int8, out, "--gguf-type", "q8_0") == 0
    assert "re-quantized to q8_0" in capsys.readouterr().out
    reader = gguf.GGUFReader(str(out))
    t = {t.name: t for t in reader.tensors}["blk.0.ffn_down_exps.weight"]
    stored = restore_item(str(int8), config, "layers_0", np.float32, quantized="int8")["w_down"]
    w = (stored["q"].astype(np.float32) * stored["scale"]).transpose(0, 2, 1)   # the int8 values, dequantized
    d = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(values(t).reshape(w.shape) - w).reshape(-1, 32) <= d * (0.5 + 127 * 2.0 ** -11) + 1e-7)
    # and both roundings together stay near the float weights
    np.testing.assert_allclose(values(t).reshape(w.shape), params["layers_0"]["w_down"].transpose(0, 2, 1),
                               atol=0.02 * np.abs(params["layers_0"]["w_down"]).max())


def test_bad_requests_exit_2_and_leave_nothing(model, tmp_path, capsys):
    path, _, _ = model
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep")
    assert export(path, out) == 2 and out.read_bytes() == b"keep"
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(path), str(tmp_path / "hf"), "--format", "hf", "--gguf-type", "f16"]) == 2
    assert "--gguf-type goes with --format gguf" in capsys.readouterr().err
    assert export(tmp_path / "missing", tmp_path / "y.gguf") == 2
    assert f"{tmp_path / 'missing'}: no such file or directory" in capsys.readouterr().err
    assert not (tmp_path / "y.gguf").exists()
    assert list(tmp_path.iterdir()) == [out]


def test_bench_llama_bench_flag_checks_its_inputs(tmp_path, capsys):
    """`bench --llama-bench` (llama.cpp runs are not part of the suite): a missing binary and a config
    without Mixtral's vocabulary are usage errors before anything is built."""
    assert main(["bench", "--no-hf", "--llama-bench", str(tmp_path / "llama-bench")]) == 2
    assert "no such file" in capsys.readouterr().err
    binary = tmp_path / "llama-bench"
    binary.write_text("")
    assert main(["bench", "--no-hf", "--config", "tiny", "--llama-bench", str(binary)]) == 2
    assert "--llama-bench needs a config with Mixtral's vocabulary" in capsys.readouterr().err
    assert main(["bench", "--no-hf", "--config", "tiny", "--weight-types", "float32,fp8"]) == 2
    assert "--weight-types: fp8; choose from float32, bfloat16, int8" in capsys.readouterr().err
