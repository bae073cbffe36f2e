"""int8 weight-only quantization: accuracy against float, checkpoints, and the planner."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_convert import convert, write_folder
from mixtral_jax.checkpoint import param_items
from mixtral_jax.plan import plan_memory
from mixtral_jax.quant import dequantize, quantize_int8, quantize_params
from mixtral_jax.model import split_experts

TINY = mj.MixtralConfig.tiny()
KL_LIMIT = 1e-2  # DESIGN.md §4: per-token KL of a lower-precision model vs float32


def kl(p_logits, q_logits):
    p = jax.nn.log_softmax(jnp.asarray(p_logits), -1)
    q = jax.nn.log_softmax(jnp.asarray(q_logits), -1)
    return np.asarray(jnp.sum(jnp.exp(p) * (p - q), -1))


def test_quantize_roundtrip_error_is_bounded(rng):
    w = jnp.asarray(rng.standard_normal((64, 4, 16)), jnp.float32)
    qw = quantize_int8(w, (0,))
    assert qw["q"].dtype == jnp.int8 and qw["scale"].shape == (1, 4, 16)
    err = np.abs(np.asarray(dequantize(qw)) - np.asarray(w))
    assert np.all(err <= np.asarray(qw["scale"]) / 2 + 1e-7)


@pytest.mark.parametrize("layout", ["stacked", "split"])
def test_int8_model_is_close_to_float(rng, layout):
    params = mj.init_params(TINY, seed=3)
    params = split_experts(params) if layout == "split" else params
    tokens = rng.integers(0, TINY.vocab_size, (4, 48))
    ref = mj.forward(TINY, params, tokens)
    quantized = quantize_params(params)
    assert quantized["lm_head"].dtype == jnp.bfloat16  # whatever the float dtype (mixtral_jax.quant)
    got = mj.forward(TINY, quantized, tokens)
    per_token = kl(ref, got)
    assert per_token.max() < KL_LIMIT
    agree = float(np.mean(np.asarray(ref).argmax(-1) == np.asarray(got).argmax(-1)))
    assert agree > 0.9


def test_convert_quantize_and_load(tmp_path, rng):
    params = mj.init_params(TINY, seed=5)
    write_folder(str(tmp_path / "hf"), TINY, param_items(TINY, params), "hf", np.float32)
    summary = convert(str(tmp_path / "hf"), str(tmp_path / "q"), quantize="int8")
    assert summary["quantize"] == "int8"
    model = mj.load(tmp_path / "q")
    assert model.params["layers_0"]["wq"]["q"].dtype == jnp.int8
    # lm_head in bfloat16 whatever the float dtype (mixtral_jax.quant); the embedding stays float32
    assert model.params["lm_head"].dtype == jnp.bfloat16 and model.params["embed"].dtype == jnp.float32
    tokens = rng.integers(0, TINY.vocab_size, (2, 20))
    assert kl(mj.forward(TINY, params, tokens), model(tokens)).max() < KL_LIMIT
    on_the_fly = mj.load(tmp_path / "hf", quantize="int8")
    assert on_the_fly.params["lm_head"].dtype == jnp.bfloat16
    assert mj.load(tmp_path / "hf").params["lm_head"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(on_the_fly(tokens)), np.asarray(model(tokens)), atol=1e-5)
    with pytest.raises(ValueError, match="cannot be exported"):
        from mixtral_convert import export
        export(str(tmp_path / "q"), str(tmp_path / "back"), fmt="hf")


def test_plan_int8_8x7b_fits_one_80gb_gpu():
    c = mj.MixtralConfig.mixtral_8x7b()
    p = plan_memory(c, {"data": 1, "expert": 1, "tensor": 1}, dtype="bfloat16", batch=8, max_seq_len=4096,
                    quantize="int8")
    expert_params = 45_097_156_608
    assert expert_params <= p["weights"]["experts"] < expert_params * 1.001  # 1 byte + scales
    assert 46e9 < p["weights_total"] < 48e9 and p["total"] < 80e9


def test_plan_int8_counts_lm_head_in_bfloat16():
    c = mj.MixtralConfig.small()
    mesh = {"data": 1, "expert": 1, "tensor": 1}
    full = plan_memory(c, mesh, dtype="float32", quantize=None)
    int8 = plan_memory(c, mesh, dtype="float32", quantize="int8")
    # embed stays float32, lm_head goes from 4 bytes a number to 2
    assert full["weights"]["embeddings"] - int8["weights"]["embeddings"] == 2 * c.vocab_size * c.d_model
