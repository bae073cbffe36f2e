"""Conversion HF/Mistral -> orbax -> HF/Mistral: logits, bit-exact round trips, bad sources."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_convert import SafetensorsFile, write_folder, write_safetensors
from mixtral_jax.checkpoint import param_items
from conftest import GQA, hf_logits, hf_model
from tolerances import LOGITS_ATOL

CLI = [sys.executable, "-m", "mixtral_jax.cli"]


def run_cli(*args, check_rc=0):
    proc = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True)
    assert proc.returncode == check_rc, proc.stderr
    return proc


def original_qk(w, n_heads):
    """HF rotate-half rows -> Mistral's interleaved-pair rows (DESIGN.md §3, the inverse permutation)."""
    rows, d = w.shape
    h = rows // n_heads
    return w.reshape(n_heads, 2, h // 2, d).transpose(0, 2, 1, 3).reshape(rows, d)


def mistral_tensors(model, config, stacked=False):
    """The HF model's weights under Mistral's original names and q/k row order."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    f = config.d_ff
    for i in range(config.n_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        out[o + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[o + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[o + "attention.wq.weight"] = original_qk(sd[p + "self_attn.q_proj.weight"], config.n_heads)
        out[o + "attention.wk.weight"] = original_qk(sd[p + "self_attn.k_proj.weight"], config.n_kv_heads)
        out[o + "attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        out[o + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        gate_up, down = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]
        w1, w3, w2 = gate_up[:, :f], gate_up[:, f:], down            # [E,F,D], [E,F,D], [E,D,F]
        if stacked:  # the torrent release: [E·F, D] each, w2 stored transposed
            out[o + "block_sparse_moe.gate.weight"] = sd[p + "mlp.gate.weight"]
            out[o + "block_sparse_moe.w1"] = w1.reshape(-1, config.d_model)
            out[o + "block_sparse_moe.w3"] = w3.reshape(-1, config.d_model)
            out[o + "block_sparse_moe.w2"] = w2.transpose(0, 2, 1).reshape(-1, config.d_model)
        else:
            out[o + "feed_forward.gate.weight"] = sd[p + "mlp.gate.weight"]
            for j in range(config.n_experts):
                out[o + f"feed_forward.experts.{j}.w1.weight"] = w1[j]
                out[o + f"feed_forward.experts.{j}.w3.weight"] = w3[j]
                out[o + f"feed_forward.experts.{j}.w2.weight"] = w2[j]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def write_mistral_folder(path, model, config, **kw):
    path.mkdir()
    write_safetensors(str(path / "consolidated.safetensors"), mistral_tensors(model, config, **kw))
    (path / "params.json").write_text(json.dumps(config.to_mistral()))
    return path


def all_tensors(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            f = SafetensorsFile(os.path.join(folder, name))
            out.update({k: f.read(k) for k in f.keys()})
    return out


def assert_bit_identical(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    model = hf_model(GQA, seed=11)
    path = tmp_path_factory.mktemp("src") / "hf"
    model.save_pretrained(path, max_shard_size="30KB")
    assert len(list(path.glob("*.safetensors"))) > 3
    return model, path


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(1).integers(0, GQA.vocab_size, (2, 17))


def test_interleaved_permutation_matches_interleaved_rope(rng):
    """Ground truth for `original_qk`: rotate-half RoPE on HF rows gives the same q·k as Mistral's
    complex-pair RoPE on the permuted rows."""
    n, h, d = 2, 8, 5
    wq, wk = rng.standard_normal((n * h, d)), rng.standard_normal((n * h, d))
    x_m, x_n, m, p = rng.standard_normal(d), rng.standard_normal(d), 7, 3
    freqs = 1e6 ** (-np.arange(0, h, 2) / h)

    def rotate_half(v, pos):
        ang = np.concatenate([freqs, freqs]) * pos
        return v * np.cos(ang) + np.concatenate([-v[h // 2:], v[:h // 2]]) * np.sin(ang)

    def interleaved(v, pos):
        c = (v[0::2] + 1j * v[1::2]) * np.exp(1j * freqs * pos)
        return np.stack([c.real, c.imag], -1).ravel()

    for head in range(n):
        rows = slice(head * h, (head + 1) * h)
        ref = rotate_half(wq[rows] @ x_m, m) @ rotate_half(wk[rows] @ x_n, p)
        got = (interleaved(original_qk(wq, n)[rows] @ x_m, m) @
               interleaved(original_qk(wk, n)[rows] @ x_n, p))
        np.testing.assert_allclose(got, ref, rtol=1e-10)


def test_hf_to_orbax_matches_hf_logits(hf, tokens, tmp_path):
    model, src = hf
    run_cli("convert", src, tmp_path / "ck")
    loaded = mj.load(tmp_path / "ck")
    np.testing.assert_allclose(np.asarray(loaded(tokens)), hf_logits(model, tokens), atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("stacked", [False, True], ids=["consolidated", "torrent-stacked"])
def test_mistral_to_orbax_gives_the_same_logits(hf, tokens, tmp_path, stacked):
    model, _ = hf
    src = write_mistral_folder(tmp_path / "mistral", model, GQA, stacked=stacked)
    run_cli("convert", src, tmp_path / "ck")
    ref = hf_logits(model, tokens)
    np.testing.assert_allclose(np.asarray(mj.load(tmp_path / "ck")(tokens)), ref, atol=LOGITS_ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(mj.load(src)(tokens)), ref, atol=LOGITS_ATOL, rtol=0)


def test_several_consolidated_pth_files_with_allow_pickle(hf, tokens, tmp_path):
    import torch

    model, _ = hf
    tensors = mistral_tensors(model, GQA)
    src = tmp_path / "pth"
    src.mkdir()
    keys = sorted(tensors)
    for n, part in enumerate((keys[::2], keys[1::2])):
        torch.save({k: torch.from_numpy(tensors[k]) for k in part}, src / f"consolidated.{n:02d}.pth")
    (src / "params.json").write_text(json.dumps(GQA.to_mistral()))
    proc = run_cli("convert", src, tmp_path / "refused", check_rc=2)
    assert "--allow-pickle" in proc.stderr and not (tmp_path / "refused").exists()
    run_cli("convert", src, tmp_path / "ck", "--allow-pickle")
    np.testing.assert_allclose(np.asarray(mj.load(tmp_path / "ck")(tokens)), hf_logits(model, tokens),
                               atol=LOGITS_ATOL, rtol=0)


def test_export_hf_loads_in_transformers(hf, tokens, tmp_path):
    import transformers

    model, src = hf
    run_cli("convert", src, tmp_path / "ck")
    run_cli("export", tmp_path / "ck", tmp_path / "back", "--format", "hf")
    back = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "back", experts_implementation="eager",
                                                           attn_implementation="eager")
    np.testing.assert_allclose(hf_logits(back, tokens), hf_logits(model, tokens), atol=LOGITS_ATOL, rtol=0)


def test_hf_round_trip_is_bit_exact(hf, tmp_path):
    _, src = hf
    run_cli("convert", src, tmp_path / "ck")
    run_cli("export", tmp_path / "ck", tmp_path / "back", "--format", "hf")
    assert_bit_identical(all_tensors(src), all_tensors(tmp_path / "back"))


def test_mistral_round_trip_is_bit_exact(hf, tmp_path):
    model, _ = hf
    src = write_mistral_folder(tmp_path / "mistral", model, GQA)
    run_cli("convert", src, tmp_path / "ck")
    run_cli("export", tmp_path / "ck", tmp_path / "back", "--format", "mistral")
    assert_bit_identical(all_tensors(src), all_tensors(tmp_path / "back"))
    assert mj.MixtralConfig.from_mistral(tmp_path / "back") == GQA


def test_bfloat16_stays_bfloat16_and_dtype_flag(hf, tmp_path):
    _, src = hf
    run_cli("convert", src, tmp_path / "bf16", "--dtype", "bfloat16")
    run_cli("export", tmp_path / "bf16", tmp_path / "hf_bf16", "--format", "hf")
    run_cli("convert", tmp_path / "hf_bf16", tmp_path / "again")
    info = json.loads(run_cli("info", tmp_path / "again", "--json").stdout)
    assert info["dtype"] == "bfloat16" and info["parameters"] == mj.model.count_params(GQA)
    assert all(a.dtype == "bfloat16" for a in all_tensors(tmp_path / "hf_bf16").values())
    assert mj.load(tmp_path / "again", dtype="bfloat16", layout="stacked").params["layers_2"]["w_down"].dtype == "bfloat16"


def test_tokenizer_travels_with_the_checkpoint(hf, tmp_path):
    _, src = hf
    with_tok = tmp_path / "with_tok"
    shutil.copytree(src, with_tok)
    shutil.copy(mj.Tokenizer().path, with_tok / "tokenizer.model")
    run_cli("convert", with_tok, tmp_path / "ck")
    assert mj.load(tmp_path / "ck").tokenizer.vocab_size == 32000
    run_cli("export", tmp_path / "ck", tmp_path / "mis", "--format", "mistral")
    assert (tmp_path / "mis" / "tokenizer.model").exists()


def test_generation_config_travels_with_the_checkpoint(hf, tmp_path):
    """convert copies generation_config.json (as it is, validated), load reads it, export hf writes it."""
    _, src = hf
    with_gc = tmp_path / "with_gc"
    shutil.copytree(src, with_gc)
    text = json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": 2, "bos_token_id": 1})
    (with_gc / "generation_config.json").write_text(text)
    run_cli("convert", with_gc, tmp_path / "ck")
    assert (tmp_path / "ck" / "generation_config.json").read_text() == text
    assert mj.load(tmp_path / "ck").generation_config == {"do_sample": True, "temperature": 0.6, "top_p": 0.9,
                                                          "eos_token_id": [2]}
    run_cli("export", tmp_path / "ck", tmp_path / "back", "--format", "hf")
    assert (tmp_path / "back" / "generation_config.json").read_text() == text
    run_cli("export", tmp_path / "ck", tmp_path / "mis", "--format", "mistral")
    assert not (tmp_path / "mis" / "generation_config.json").exists()  # the Mistral format has none
    (with_gc / "generation_config.json").write_text(json.dumps({"top_k": -3}))
    proc = run_cli("convert", with_gc, tmp_path / "bad", check_rc=2)
    assert "generation_config.json: top_k" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("bad*"))


def test_info_text(hf):
    _, src = hf
    out = run_cli("info", src).stdout
    assert "hf checkpoint" in out and f"{mj.model.count_params(GQA):,} parameters" in out and " GB" in out


def corrupt(kind, src, dst):
    """A copy of the HF folder `src` at `dst`, broken in one way."""
    shutil.copytree(src, dst)
    shards = sorted(dst.glob("model-*.safetensors"))
    index = dst / "model.safetensors.index.json"
    if kind == "truncated shard":
        shards[2].write_bytes(shards[2].read_bytes()[:-7])
    elif kind == "shard missing from the index":
        shards[1].unlink()
    elif kind == "corrupt header":
        data = bytearray(shards[0].read_bytes())
        data[8:12] = b"\xff\xfe{["
        shards[0].write_bytes(bytes(data))
    elif kind == "config inconsistent with shapes":
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(dict(cfg, hidden_size=44)))
    elif kind == "missing config":
        (dst / "config.json").unlink()
    elif kind == "unexpected key":
        write_safetensors(str(dst / "extra.safetensors"), {"model.layers.0.bias": np.zeros(3, np.float32)})
        index.unlink()
    elif kind == "duplicate key":
        f = SafetensorsFile(str(shards[0]))
        write_safetensors(str(dst / "dup.safetensors"), {k: f.read(k) for k in f.keys()})
        index.unlink()
    elif kind == "pickle without --allow-pickle":
        for s in shards:
            s.unlink()
        index.unlink()
        (dst / "pytorch_model.bin").write_bytes(b"not really a pickle")
    elif kind == "source does not exist":
        shutil.rmtree(dst)
    return dst


BAD_SOURCES = {  # kind -> what the one line must name
    "truncated shard": "truncated", "shard missing from the index": "missing",
    "corrupt header": "corrupt", "config inconsistent with shapes": "shape",
    "missing config": "no config.json", "unexpected key": "unexpected tensor",
    "duplicate key": "also found", "pickle without --allow-pickle": "--allow-pickle",
    "source does not exist": "no such file",
}


@pytest.mark.parametrize("kind", list(BAD_SOURCES))
def test_bad_sources_exit_2_with_one_line_and_no_out(hf, tmp_path, kind):
    _, src = hf
    bad = corrupt(kind, src, tmp_path / "bad")
    out = tmp_path / "out"
    proc = run_cli("convert", bad, out, check_rc=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert BAD_SOURCES[kind] in lines[0]
    if kind not in ("source does not exist", "missing config", "config inconsistent with shapes"):
        assert str(bad) in lines[0]  # names the file
    assert not out.exists() and not list(tmp_path.glob("out*"))


def test_existing_out_is_left_untouched(hf, tmp_path):
    _, src = hf
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_cli("convert", src, out, check_rc=2)
    assert "already exists" in proc.stderr
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_killed_conversion_leaves_no_valid_looking_out(tmp_path):
    """SIGKILL midway: OUT never appears; only a `.partial-PID` folder without a manifest."""
    config = GQA.replace(n_layers=40)
    params = mj.init_params(config)
    src = tmp_path / "big"
    write_folder(str(src), config, param_items(config, params), "hf", np.float32)
    out = tmp_path / "out"
    proc = subprocess.Popen(CLI + ["convert", str(src), str(out)], stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        partial = list(tmp_path.glob("out.partial-*/params/layers_1"))
        if partial:
            break
        time.sleep(0.05)
    assert partial, "conversion did not start writing in time"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    leftovers = list(tmp_path.glob("out.partial-*"))
    assert leftovers and not (leftovers[0] / "mixtral_jax.json").exists()
    with pytest.raises(ValueError):
        mj.load(leftovers[0])
