"""Blockwise (online-softmax) attention against the materialised oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax import attention as att
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


def chunk_case(rng, t, s, offsets, new, k=2, n=6, h=16):
    """A chunk of t new tokens (new[b] valid) after offsets[b] cached ones: the chunk's own k/v and the
    cache holding the past and the chunk, as the decoder passes them."""
    b = len(offsets)
    offsets, new = np.asarray(offsets, np.int32), np.asarray(new, np.int32)
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    k_new = jnp.asarray(rng.standard_normal((b, t, k, h)), jnp.float32)
    v_new = jnp.asarray(rng.standard_normal((b, t, k, h)), jnp.float32)
    cache_k = np.asarray(rng.standard_normal((b, s, k, h)), np.float32)
    cache_v = np.asarray(rng.standard_normal((b, s, k, h)), np.float32)
    for r in range(b):
        cache_k[r, offsets[r]:offsets[r] + new[r]] = np.asarray(k_new[r, :new[r]])
        cache_v[r, offsets[r]:offsets[r] + new[r]] = np.asarray(v_new[r, :new[r]])
    q_pos = jnp.asarray(offsets[:, None] + np.arange(t)[None, :], jnp.int32)
    kv_len = jnp.asarray(offsets + new)
    chunk = att.Chunk(k_new, v_new, jnp.asarray(new), jnp.asarray(offsets))
    valid = np.arange(t)[None, :] < new[:, None]
    return q, jnp.asarray(cache_k), jnp.asarray(cache_v), q_pos, kv_len, chunk, valid


KERNEL_CASES = [  # (T, S, offsets, new)
    (128, 256, [0, 128], [128, 100]), (1, 300, [299, 17], [1, 1]), (40, 90, [50, 0], [40, 33]),
]


@pytest.mark.parametrize("t, s, offsets, new", KERNEL_CASES, ids=str)
def test_sdpa_two_call_merge_equals_blockwise(rng, t, s, offsets, new):
    """The cuDNN path's calls (chunk causal + cache prefix, merged by log-sum-exp), run here through
    jax.nn.dot_product_attention's XLA implementation: the same arithmetic as on a GPU."""
    q, k, v, q_pos, kv_len, chunk, valid = chunk_case(rng, t, s, offsets, new)
    ref = np.asarray(blockwise_attention(q, k, v, q_pos, kv_len))
    got = np.asarray(att.sdpa_attention(q, chunk, (k, v, chunk.offset), implementation="xla"))
    assert np.max(np.abs(got - ref)[valid]) <= BLOCKWISE_ATOL
    alone = att.Chunk(chunk.k, chunk.v, chunk.new_len, None)          # no cache: the chunk alone
    own = np.asarray(att.sdpa_attention(q, alone, None, implementation="xla", sliding_window=9))
    ref = np.asarray(blockwise_attention(q, chunk.k, chunk.v, q_pos - chunk.offset[:, None], chunk.new_len,
                                         sliding_window=9))
    assert np.max(np.abs(own - ref)[valid]) <= BLOCKWISE_ATOL


@pytest.mark.slow
@pytest.mark.parametrize("window", [None, 48])
def test_splash_in_interpret_mode_equals_blockwise(rng, window):
    t, s = 128, 256
    q, k, v, q_pos, kv_len, chunk, valid = chunk_case(rng, t, s, [0, 128], [128, 100])
    if window is None:
        got = np.asarray(att.splash_attention(q, chunk, (k, v, chunk.offset), interpret=True))
        ref = np.asarray(blockwise_attention(q, k, v, q_pos, kv_len))
        assert np.max(np.abs(got - ref)[valid]) <= BLOCKWISE_ATOL
    alone = att.Chunk(chunk.k, chunk.v, chunk.new_len, None)
    got = np.asarray(att.splash_attention(q, alone, None, interpret=True, sliding_window=window))
    ref = np.asarray(blockwise_attention(q, chunk.k, chunk.v, q_pos - chunk.offset[:, None], chunk.new_len,
                                         sliding_window=window))
    assert np.max(np.abs(got - ref)[valid]) <= BLOCKWISE_ATOL


def test_auto_chooses_by_platform_and_falls_back(rng):
    q, k, v, _, _, chunk, _ = chunk_case(rng, 128, 256, [0, 128], [128, 100])
    bf16 = q.astype(jnp.bfloat16)
    int8 = att.Quantized(jnp.zeros(k.shape, jnp.int8), jnp.ones(k.shape[:-1]))
    assert att.choose("auto", q, k, chunk, platform="cpu") == "blockwise"
    assert att.choose("auto", bf16, k, chunk, platform="gpu") == "cudnn"
    assert att.choose("auto", q, k, chunk, platform="gpu") == "blockwise"          # float32: no cuDNN
    assert att.choose("auto", bf16, int8, chunk, platform="gpu") == "blockwise"    # int8 cache
    assert att.choose("auto", bf16, k, chunk, sliding_window=48, platform="gpu") == "blockwise"
    assert att.choose("auto", q, k, chunk, platform="tpu") == "splash"
    assert att.choose("auto", q[:, :100], k, chunk, platform="tpu") == "blockwise"  # not whole blocks
    assert att.choose("materialized", q, k, chunk, platform="tpu") == "materialized"
    with pytest.raises(ValueError, match="GPU"):
        att.choose("cudnn", bf16, k, chunk, platform="cpu")
    with pytest.raises(ValueError, match="multiples of 128"):
        att.choose("splash", q[:, :100], k, chunk, platform="tpu")
    with pytest.raises(ValueError, match="unknown attention"):
        att.check_name("flash")
