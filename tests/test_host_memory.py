"""host_memory.place: large CPU weights in huge-page-advised maps, equal to a plain copy."""

import dataclasses
import gc
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax import checkpoint, host_memory
from conftest import GQA

linux_thp = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")


def in_own_advised_map(x: jax.Array) -> bool:
    """Whether `x`'s buffer starts a mapping of its own advised MADV_HUGEPAGE ("hg" in its
    VmFlags), as `place` makes them; XLA's buffers sit inside its heap or after a malloc header."""
    pointer = x.unsafe_buffer_pointer()
    start = end = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(v, 16) for v in head.split("-"))
            elif head == "VmFlags:" and start <= pointer < end:
                return pointer == start and "hg" in line.split()[1:]
    raise AssertionError(f"no mapping holds {pointer:#x}")


@pytest.fixture
def huge_pages_on(monkeypatch):
    monkeypatch.delenv(host_memory.ENV, raising=False)
    host_memory.available.cache_clear()
    yield host_memory.available()
    host_memory.available.cache_clear()


@linux_thp
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.int8])
def test_large_arrays_go_in_advised_maps_and_equal_a_plain_copy(huge_pages_on, dtype):
    if not huge_pages_on:
        pytest.skip("transparent huge pages are off on this machine")
    source = np.random.default_rng(0).standard_normal((3000, 1000)).astype(dtype)  # 3-12 MB
    expected = source.copy()
    x = host_memory.place(source)
    assert x.dtype == expected.dtype and x.shape == expected.shape
    assert in_own_advised_map(x)
    del source
    gc.collect()  # the array keeps its map
    np.testing.assert_array_equal(np.asarray(x), expected)
    # a donated weight is consumed like any other buffer
    doubled = jax.jit(lambda a: a + a, donate_argnums=0)(x)
    np.testing.assert_array_equal(np.asarray(doubled), expected + expected)


def test_small_arrays_and_the_switch_keep_xla_buffers(monkeypatch):
    small = np.ones((16, 16), np.float32)
    assert not in_own_advised_map(host_memory.place(small))
    monkeypatch.setenv(host_memory.ENV, "0")
    host_memory.available.cache_clear()
    try:
        assert not host_memory.available()
        large = np.ones((1024, 1024), np.float32)
        x = host_memory.place(large)
        assert not in_own_advised_map(x)
        np.testing.assert_array_equal(np.asarray(x), large)
    finally:
        host_memory.available.cache_clear()


@linux_thp
def test_a_loaded_checkpoint_puts_its_large_weights_in_huge_pages(huge_pages_on, tmp_path, rng):
    if not huge_pages_on:
        pytest.skip("transparent huge pages are off on this machine")
    config = dataclasses.replace(GQA, vocab_size=16000)  # embed and lm_head of 2.6 MB each
    params = mj.init_params(config, seed=3)
    checkpoint.save(tmp_path / "ck", config, params)
    loaded = checkpoint.load(tmp_path / "ck", layout="stacked").params  # the layout of `params`
    for name in ("embed", "lm_head"):
        assert in_own_advised_map(loaded[name]), name
    tokens = rng.integers(0, config.vocab_size, (1, 8))
    np.testing.assert_array_equal(np.asarray(mj.forward(config, loaded, tokens)),
                                  np.asarray(mj.forward(config, params, tokens)))
