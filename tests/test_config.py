"""MixtralConfig: presets, readers, validation and warnings."""

import dataclasses
import json

import jax
import pytest

import mixtral_jax as mj
from mixtral_jax import MixtralConfig
from conftest import GQA

MISTRAL_PARAMS = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32,
                  "n_kv_heads": 8, "norm_eps": 1e-05, "vocab_size": 32000,
                  "moe": {"num_experts_per_tok": 2, "num_experts": 8}}


def test_frozen_and_hashable():
    c = MixtralConfig.mixtral_8x7b()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.d_model = 1
    assert hash(c) == hash(MixtralConfig.mixtral_8x7b()) and {c: 1}[MixtralConfig.mixtral_8x7b()] == 1
    assert [f.name for f in dataclasses.fields(c)] == [
        "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "n_experts",
        "top_k", "rope_theta", "norm_eps", "max_seq_len", "sliding_window", "router_aux_loss_coef"]


def test_presets():
    c = MixtralConfig.mixtral_8x7b()
    assert (c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff, c.n_experts, c.top_k,
            c.vocab_size, c.rope_theta, c.norm_eps, c.max_seq_len, c.sliding_window) == (
        4096, 32, 32, 8, 128, 14336, 8, 2, 32000, 1e6, 1e-5, 32768, None)
    big = MixtralConfig.mixtral_8x22b()
    assert (big.d_model, big.n_layers, big.n_heads, big.d_ff) == (6144, 56, 48, 16384)
    assert MixtralConfig.preset("mixtral-8x7b") == c


def test_from_hf_roundtrips_transformers_config(tmp_path):
    import transformers

    hf = transformers.MixtralConfig(vocab_size=101, hidden_size=40, intermediate_size=37,
                                    num_hidden_layers=3, num_attention_heads=5, num_key_value_heads=1,
                                    max_position_embeddings=4096, router_aux_loss_coef=0.02)
    hf.save_pretrained(tmp_path)
    c = MixtralConfig.from_hf(tmp_path)
    assert c == MixtralConfig.from_hf(tmp_path / "config.json")
    assert c == MixtralConfig.from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert (c.d_model, c.head_dim, c.n_kv_heads, c.rope_theta, c.max_seq_len) == (40, 8, 1, 1e6, 4096)
    assert MixtralConfig.from_hf(GQA.to_hf()) == GQA


def test_from_hf_reads_old_top_level_rope_theta():
    d = GQA.to_hf()
    del d["rope_parameters"]
    d["rope_theta"] = 5e5
    assert MixtralConfig.from_hf(d).rope_theta == 5e5


def test_from_mistral_defaults():
    c = MixtralConfig.from_mistral(MISTRAL_PARAMS)
    assert c == MixtralConfig.mixtral_8x7b()
    assert MixtralConfig.from_mistral(GQA.to_mistral()) == GQA


@pytest.mark.parametrize("field, value", [("n_heads", 0), ("d_model", -4), ("vocab_size", 1.5),
                                          ("top_k", 9), ("norm_eps", 0.0), ("sliding_window", 0),
                                          ("head_dim", 7), ("n_kv_heads", 4)])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        GQA.replace(**{field: value})


def test_inconsistent_files_are_rejected():
    with pytest.raises(ValueError, match="rope_type"):
        MixtralConfig.from_hf(dict(GQA.to_hf(), rope_parameters={"rope_type": "yarn", "factor": 4}))
    with pytest.raises(ValueError, match="hidden_size"):
        MixtralConfig.from_hf({k: v for k, v in GQA.to_hf().items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="model_type"):
        MixtralConfig.from_hf(dict(GQA.to_hf(), model_type="llama"))
    with pytest.raises(ValueError, match="moe"):
        MixtralConfig.from_mistral({k: v for k, v in MISTRAL_PARAMS.items() if k != "moe"})
    with pytest.raises(ValueError, match="no such file"):
        MixtralConfig.from_hf("/nonexistent/folder")


def test_known_wrong_mixtral_settings_warn():
    with pytest.warns(UserWarning, match="sliding_window"):
        MixtralConfig.from_hf(dict(GQA.to_hf(), sliding_window=4096))
    with pytest.warns(UserWarning, match="rope_theta"):
        MixtralConfig.from_mistral(dict(MISTRAL_PARAMS, rope_theta=10000.0))


def test_8x7b_parameter_count_and_layout():
    c = MixtralConfig.mixtral_8x7b()
    shapes = jax.eval_shape(mj.init_params, c)
    assert sum(x.size for x in jax.tree.leaves(shapes)) == 46_702_792_704
    expected_layer = {"attn_norm": (4096,), "ffn_norm": (4096,), "wq": (4096, 32, 128),
                      "wk": (4096, 8, 128), "wv": (4096, 8, 128), "wo": (32, 128, 4096),
                      "router": (4096, 8), "w_gate": (8, 4096, 14336), "w_up": (8, 4096, 14336),
                      "w_down": (8, 14336, 4096)}
    assert set(shapes) == {"embed", "final_norm", "lm_head"} | {f"layers_{i}" for i in range(32)}
    assert shapes["embed"].shape == (32000, 4096) and shapes["lm_head"].shape == (4096, 32000)
    assert shapes["final_norm"].shape == (4096,)
    for i in range(32):
        assert {k: v.shape for k, v in shapes[f"layers_{i}"].items()} == expected_layer
    assert jax.eval_shape(lambda: mj.init_params(c, dtype="bfloat16"))["embed"].dtype == "bfloat16"
