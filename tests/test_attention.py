"""Blockwise (online-softmax) attention against the materialised oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.attention import blockwise_attention, materialized_attention

BLOCKWISE_ATOL = 2e-6


def case(rng, t, s, offsets, window, b=2, n=6, k=2, h=16):
    """Random q/k/v with per-row cache offsets and right padding of the new tokens."""
    offsets = np.asarray(offsets, np.int32)
    new = np.array([t, max(1, t - 5)], np.int32)[:b]
    assert np.all(offsets + t <= s)
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    kk = jnp.asarray(rng.standard_normal((b, s, k, h)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, s, k, h)), jnp.float32)
    q_pos = jnp.asarray(offsets[:, None] + np.arange(t)[None, :], jnp.int32)
    kv_len = jnp.asarray(offsets + new, jnp.int32)
    valid = np.arange(t)[None, :] < new[:, None]
    return (q, kk, v, q_pos, kv_len), valid


GRID = [  # (T, S, offsets): prefill, chunks after a cache, decode
    (1, 1, [0, 0]), (1, 2048, [2000, 47]), (7, 64, [0, 30]), (64, 64, [0, 0]), (64, 1024, [900, 3]),
    (300, 300, [0, 0]), (300, 2048, [1500, 1748]), (1000, 1000, [0, 0]), (1000, 2048, [1048, 517]),
]


@pytest.mark.parametrize("t, s, offsets", GRID, ids=lambda x: str(x))
@pytest.mark.parametrize("window", [None, 48])
def test_blockwise_equals_materialized(rng, t, s, offsets, window):
    args, valid = case(rng, t, s, offsets, window)
    ref = np.asarray(materialized_attention(*args, sliding_window=window))
    for blocks in ((64, 128), (512, 512), (7, 33)):
        got = np.asarray(blockwise_attention(*args, sliding_window=window, block_q=blocks[0], block_k=blocks[1]))
        assert np.max(np.abs(got - ref)[valid]) <= BLOCKWISE_ATOL, blocks
        full = np.asarray(blockwise_attention(*args, sliding_window=window, block_q=blocks[0], block_k=blocks[1],
                                              skip=False))
        np.testing.assert_array_equal(got[valid], full[valid])
        assert np.all(np.isfinite(got))


def test_blockwise_without_skipping_is_differentiable(rng):
    args, valid = case(rng, 40, 40, [0, 0], None)
    mask = jnp.asarray(valid)[:, :, None, None]

    def loss(fn, q, k, v):
        return jnp.sum(jnp.where(mask, fn(q, k, v, *args[3:]), 0.0) ** 2)

    blockwise = lambda *a: blockwise_attention(*a, block_q=16, block_k=8, skip=False)  # noqa: E731
    got = jax.grad(lambda *a: loss(blockwise, *a), argnums=(0, 1, 2))(*args[:3])
    ref = jax.grad(lambda *a: loss(materialized_attention, *a), argnums=(0, 1, 2))(*args[:3])
    for g, r in zip(got, ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=1e-5)
