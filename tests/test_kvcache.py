"""The KV cache: int8 layout and bytes, quantization error, and agreement with a float cache."""

import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax import kvcache
from mixtral_jax.checkpoint import demo_model_path
from conftest import GQA

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from kv_int8_agreement import teacher_forced  # noqa: E402


def payload_and_scale_bytes(cache):
    payload = sum(a.nbytes for name, layer in cache.items() if name != "lengths"
                  for key, a in layer.items() if key in ("k", "v"))
    scales = sum(a.nbytes for name, layer in cache.items() if name != "lengths"
                 for key, a in layer.items() if key.endswith("_scale"))
    return payload, scales


def test_int8_payload_is_half_of_bfloat16_and_a_quarter_of_float32():
    c = GQA
    int8 = payload_and_scale_bytes(mj.init_cache(c, 3, 50, dtype="int8"))
    bf16 = payload_and_scale_bytes(mj.init_cache(c, 3, 50, dtype="bfloat16"))
    f32 = payload_and_scale_bytes(mj.init_cache(c, 3, 50, dtype="float32"))
    assert bf16[1] == f32[1] == 0
    assert int8[0] * 2 == bf16[0] and int8[0] * 4 == f32[0]
    assert int8[1] == 2 * c.n_layers * 3 * 50 * c.n_kv_heads * 4  # a float32 scale per token, head, k/v
    with pytest.raises(ValueError, match="cache dtype"):
        mj.init_cache(c, 1, 8, dtype="int4")


def test_quantization_error_is_within_half_a_step(rng):
    x = jnp.asarray(rng.standard_normal((4, 9, 3, 16)) * rng.uniform(0.01, 10, (4, 9, 3, 1)), jnp.float32)
    x = x.at[0, 0, 0].set(0.0)  # an all-zero vector keeps a zero scale and decodes to zeros
    q = kvcache.quantize(x)
    assert q.values.dtype == jnp.int8 and q.scale.shape == (4, 9, 3)
    err = np.abs(np.asarray(kvcache.dequantize(q) - x))
    assert np.all(err <= np.asarray(q.scale)[..., None] / 2 + 1e-7)
    assert np.all(np.asarray(kvcache.dequantize(q))[0, 0, 0] == 0)


def test_int8_cache_in_forward_chunks_and_generate(rng):
    config = GQA.replace(max_seq_len=256)
    params = mj.init_params(config, seed=2)
    tokens = rng.integers(0, config.vocab_size, (2, 40))
    ref, _ = mj.forward(config, params, tokens, cache=mj.init_cache(config, 2, 64))
    got, cache = mj.forward(config, params, tokens, cache=mj.init_cache(config, 2, 64, dtype="int8"))
    chunked, _ = mj.forward(config, params, tokens, cache=mj.init_cache(config, 2, 64, dtype="int8"), prefill_chunk=9)
    assert cache["layers_0"]["k"].dtype == jnp.int8
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(got), atol=1e-5)
    assert 0 < float(jnp.max(jnp.abs(got - ref))) < 0.05   # quantized, and close
    for attention in ("blockwise", "materialized"):
        one, = mj.generate(mj.Model(config, params), [tokens[0, :20].tolist()], max_new_tokens=8, kv_dtype="int8",
                           attention=attention, stop_tokens=[])
        assert len(one) == 8
    with pytest.raises(ValueError, match="kv_dtype"):
        mj.generate(mj.Model(config, params), [[1, 2]], max_new_tokens=2, kv_dtype="int4")


def test_int8_cache_agrees_with_the_float_cache_on_the_demo_model():
    """Teacher-forced over the 20 demo prompts x 64 greedy tokens (stop_tokens=[])."""
    r = teacher_forced(mj.load(demo_model_path()))
    assert r["positions"] == 20 * 64
    assert r["argmax_agreement"] >= 0.9, r
