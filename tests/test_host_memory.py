"""host_memory.place: large CPU weights in huge-page-advised maps, equal to a plain copy."""

import dataclasses
import gc
import mmap
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax import checkpoint, host_memory
from conftest import GQA

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages and /proc/self/smaps are Linux's")


def vm_flags(pointer: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds `pointer`."""
    start = end = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(v, 16) for v in head.split("-"))
            elif head == "VmFlags:" and start <= pointer < end:
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {pointer:#x}")


@pytest.fixture
def maps(monkeypatch):
    """[start, end) of every map made during the test. (The kernel merges neighbouring maps of
    equal flags, so smaps alone cannot tell `place`'s maps from other memory.)"""
    made, real = [], mmap.mmap

    def recording(*args, **kwargs):
        region = real(*args, **kwargs)
        start = np.frombuffer(region, np.uint8).ctypes.data
        made.append((start, start + len(region)))
        return region

    monkeypatch.setattr(mmap, "mmap", recording)
    return made


def in_advised_map(x: jax.Array, made) -> bool:
    """Whether `x`'s buffer lies in one of the maps `made` and that memory is advised
    MADV_HUGEPAGE ("hg" in its VmFlags)."""
    pointer = x.unsafe_buffer_pointer()
    return any(a <= pointer < b for a, b in made) and "hg" in vm_flags(pointer)


@pytest.fixture
def huge_pages_on(monkeypatch):
    monkeypatch.delenv(host_memory.ENV, raising=False)
    host_memory.available.cache_clear()
    yield host_memory.available()
    host_memory.available.cache_clear()


@linux
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.int8])
def test_large_arrays_go_in_advised_maps_and_equal_a_plain_copy(huge_pages_on, maps, dtype):
    if not huge_pages_on:
        pytest.skip("transparent huge pages are off on this machine")
    source = np.random.default_rng(0).standard_normal((3000, 1000)).astype(dtype)  # 3-12 MB
    expected = source.copy()
    x = host_memory.place(source)
    assert x.dtype == expected.dtype and x.shape == expected.shape
    assert in_advised_map(x, maps)
    del source
    gc.collect()  # the array keeps its map
    np.testing.assert_array_equal(np.asarray(x), expected)
    # a donated weight is consumed like any other buffer
    doubled = jax.jit(lambda a: a + a, donate_argnums=0)(x)
    np.testing.assert_array_equal(np.asarray(doubled), expected + expected)


@linux
def test_small_arrays_and_the_switch_keep_xla_buffers(monkeypatch, maps):
    small = np.ones((16, 16), np.float32)
    host_memory.place(small)
    assert not maps
    monkeypatch.setenv(host_memory.ENV, "0")
    host_memory.available.cache_clear()
    try:
        assert not host_memory.available()
        large = np.ones((1024, 1024), np.float32)
        x = host_memory.place(large)
        assert not maps
        np.testing.assert_array_equal(np.asarray(x), large)
    finally:
        host_memory.available.cache_clear()


@linux
def test_a_loaded_checkpoint_puts_its_large_weights_in_huge_pages(huge_pages_on, maps, tmp_path, rng):
    if not huge_pages_on:
        pytest.skip("transparent huge pages are off on this machine")
    config = dataclasses.replace(GQA, vocab_size=16000)  # embed and lm_head of 2.6 MB each
    params = mj.init_params(config, seed=3)
    checkpoint.save(tmp_path / "ck", config, params)
    loaded = checkpoint.load(tmp_path / "ck", layout="stacked").params  # the layout of `params`
    for name in ("embed", "lm_head"):
        assert in_advised_map(loaded[name], maps), name
    tokens = rng.integers(0, config.vocab_size, (1, 8))
    np.testing.assert_array_equal(np.asarray(mj.forward(config, loaded, tokens)),
                                  np.asarray(mj.forward(config, params, tokens)))
