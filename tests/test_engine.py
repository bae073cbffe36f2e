"""The serving engine in process (no HTTP): its steps against `mj.generate` and the decoder's
segments against separate calls."""

import threading

import jax.numpy as jnp
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax.kvcache import init_cache
from mixtral_jax.model import Segment, decoder, decoder_segments
from mixtral_jax.serving.engine import Engine, Options
from tolerances import CACHE_ATOL


@pytest.fixture(scope="module")
def model():
    config = mj.MixtralConfig.tiny().replace(max_seq_len=300)
    return mj.Model(config, mj.init_params(config, seed=5))


def test_segments_equal_separate_calls(model):
    """A decode segment over every cache row plus a prompt chunk written into one row (`rows`), in one
    pass, equal the two run as separate decoder calls; untouched rows stay as they were."""
    config, params = model.config, model.params
    rng = np.random.default_rng(0)
    n, s = 3, 64
    cache = init_cache(config, n, s)
    prompts = jnp.asarray(rng.integers(3, config.vocab_size, (n, 20)), jnp.int32)
    _, cache, _, _ = decoder(config, params, prompts, jnp.asarray([20, 12, 7]), cache)
    last = jnp.asarray(rng.integers(3, config.vocab_size, (n, 1)), jnp.int32)
    live = jnp.asarray([1, 0, 1], jnp.int32)           # row 1 is reading a prompt instead
    chunk = jnp.asarray(rng.integers(3, config.vocab_size, (1, 16)), jnp.int32)
    n_chunk, row = jnp.asarray([11]), jnp.asarray([1])

    hidden, both, logits, _ = decoder_segments(config, params, [Segment(last, live), Segment(chunk, n_chunk, row)],
                                               cache)
    h_dec, after_dec, l_dec, _ = decoder(config, params, last, live, cache)
    h_chunk, after_chunk, l_chunk, _ = decoder(config, params, chunk, n_chunk, after_dec, cache_rows=row)

    tol = {"atol": CACHE_ATOL, "rtol": 0}
    np.testing.assert_allclose(np.asarray(hidden[0])[[0, 2]], np.asarray(h_dec)[[0, 2]], **tol)
    np.testing.assert_allclose(np.asarray(hidden[1])[:, :11], np.asarray(h_chunk)[:, :11], **tol)
    np.testing.assert_allclose(np.asarray(logits[1])[:, :, :11], np.asarray(l_chunk)[:, :, :11], **tol)
    np.testing.assert_array_equal(np.asarray(both["lengths"]), [21, 12 + 11, 8])
    for name in both:
        if name != "lengths":
            for key in ("k", "v"):
                np.testing.assert_allclose(np.asarray(both[name][key]), np.asarray(after_chunk[name][key]), **tol)
    # the chunk went into row 1 only, after its 12 cached tokens, and row 1's own keys equal a
    # one-row cache's
    solo = init_cache(config, 1, s)
    _, solo, _, _ = decoder(config, params, prompts[1:2], jnp.asarray([12]), solo)
    _, solo, _, _ = decoder(config, params, chunk, n_chunk, solo)
    np.testing.assert_allclose(np.asarray(both["layers_0"]["k"][1, :23]), np.asarray(solo["layers_0"]["k"][0, :23]),
                               **tol)


def _run(engine, prompts, budgets, options):
    """Submit all at once; wait (bounded) for every request; their token lists."""
    done = [threading.Event() for _ in prompts]
    reqs = [engine.submit(p, Options(max_new_tokens=b, **options), lambda e, d=d: d.set() if e.finish_reason else None)
            for p, b, d in zip(prompts, budgets, done)]
    for d in done:
        assert d.wait(300), "a request did not finish"
    return [r.tokens for r in reqs]


@pytest.mark.parametrize("options", [{}, {"temperature": 0.9, "top_k": 20, "seed": 7, "repetition_penalty": 1.3}])
def test_engine_equals_generate_with_chunks_and_mixed_steps(model, options):
    """More requests than slots, prompts longer than a chunk (read in several steps while other slots
    decode): each request's tokens equal `generate`'s for it alone, greedy and sampled."""
    rng = np.random.default_rng(1)
    lengths = [5, 70, 33, 17, 100, 2]
    prompts = [[1] + rng.integers(3, model.config.vocab_size, n - 1).tolist() for n in lengths]
    budgets = [9, 4, 12, 1, 7, 10]
    engine = Engine(model, slots=3, max_seq_len=160, prefill_chunk=32, stop_tokens=[])
    engine.start()
    try:
        got = _run(engine, prompts, budgets, options)
    finally:
        engine.shutdown()
    sampling = {k: v for k, v in options.items() if k != "seed"}
    for prompt, budget, tokens in zip(prompts, budgets, got):
        want = mj.generate(model, [prompt], max_new_tokens=budget, stop_tokens=[], seed=options.get("seed", 0),
                           **sampling)[0]
        assert tokens == list(want)


def test_chunk_sizes_pad_a_little_or_split(model):
    """A prompt's rest goes in one padded chunk when little is wasted, else the largest that fits."""
    engine = Engine(model, slots=1, max_seq_len=300, prefill_chunk=256)
    sizes = {left: engine._chunk_size(left) for left in (1, 16, 17, 60, 100, 129, 192, 200, 256, 300)}
    assert sizes == {1: 16, 16: 16, 17: 32, 60: 64, 100: 128, 129: 128, 192: 256, 200: 256, 256: 256, 300: 256}
    assert all(engine._chunk_size(n) in engine._chunks() for n in range(1, 600))


def test_cache_rows_and_blocks(model):
    """The engine's cache is a whole number of attention blocks long (no per-call padding copy)."""
    config = model.config.replace(max_seq_len=600)
    engine = Engine(mj.Model(config, model.params), slots=2, max_seq_len=300, prefill_chunk=32)
    assert engine._empty_slots().cache["layers_0"]["k"].shape[1] == 512
    engine = Engine(model, slots=2, max_seq_len=280, prefill_chunk=32)      # a context of 300: up to it
    assert engine._empty_slots().cache["layers_0"]["k"].shape[1] == 300
