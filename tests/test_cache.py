"""Cached decoding equals the uncached forward; cache bounds are checked on the host."""

import jax
import numpy as np
import pytest

import mixtral_jax as mj
from conftest import GQA, WINDOW
from tolerances import CACHE_ATOL


def wide_params(config):
    return jax.tree.map(lambda a: a * 10.0 if a.ndim > 1 else a, mj.init_params(config, seed=3))


@pytest.mark.parametrize("config", [GQA, WINDOW], ids=["gqa", "window"])
def test_prefill_then_32_steps_equals_uncached(config, rng):
    params = wide_params(config)
    prompt, steps = 9, 32
    tokens = rng.integers(0, config.vocab_size, (2, prompt + steps))
    full = np.asarray(mj.forward(config, params, tokens))
    cache = mj.init_cache(config, 2, prompt + steps, dtype="float32")
    logits, cache = mj.forward(config, params, tokens[:, :prompt], cache=cache)
    got = [np.asarray(logits)]
    for t in range(prompt, prompt + steps):
        logits, cache = mj.forward(config, params, tokens[:, t:t + 1], cache=cache)
        got.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=CACHE_ATOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache["lengths"]), [prompt + steps] * 2)


def test_rows_of_different_lengths_decode_independently(rng):
    config = GQA
    params = wide_params(config)
    lengths = np.array([3, 11, 7])
    steps = 6
    seqs = [rng.integers(0, config.vocab_size, n + steps) for n in lengths]
    prompts = np.zeros((3, lengths.max()), np.int32)
    for b, n in enumerate(lengths):
        prompts[b, :n] = seqs[b][:n]
    cache = mj.init_cache(config, 3, int(lengths.max()) + steps, dtype="float32")
    logits, cache = mj.forward(config, params, prompts, lengths=lengths, cache=cache)
    per_row = [[np.asarray(logits)[b, :n]] for b, n in enumerate(lengths)]
    for s in range(steps):
        step = np.array([[seq[n + s]] for seq, n in zip(seqs, lengths)])
        logits, cache = mj.forward(config, params, step, cache=cache)
        for b in range(3):
            per_row[b].append(np.asarray(logits)[b])
    for b in range(3):
        ref = np.asarray(mj.forward(config, params, seqs[b][None]))[0]
        np.testing.assert_allclose(np.concatenate(per_row[b]), ref, atol=CACHE_ATOL, rtol=0)


def test_cache_overflow_is_rejected():
    cache = mj.init_cache(GQA, 1, 4, dtype="float32")
    params = mj.init_params(GQA)
    _, cache = mj.forward(GQA, params, [[1, 2, 3]], cache=cache)
    with pytest.raises(ValueError, match="overflow"):
        mj.forward(GQA, params, [[1, 2]], cache=cache)


def test_init_cache_validates():
    with pytest.raises(ValueError, match="max_len"):
        mj.init_cache(GQA, 1, GQA.max_seq_len + 1)
    with pytest.raises(ValueError, match="batch"):
        mj.init_cache(GQA, 0, 8)
    cache = mj.init_cache(GQA, 2, 8)
    assert cache["layers_0"]["k"].shape == (2, 8, GQA.n_kv_heads, GQA.head_dim)
    assert len([k for k in cache if k.startswith("layers_")]) == GQA.n_layers
