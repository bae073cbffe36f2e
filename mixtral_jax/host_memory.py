"""Weights of a CPU-backend model in transparent huge pages.

Batch-1 decode reads every weight once a token, so with 4 KiB pages each token walks ~225,000
page-table entries for the `small` model (~23 million for Mixtral 8x7B in float32). llama.cpp's
mmap'd GGUF file gets 2 MiB pages from the page cache for free (`FilePmdMapped` in its smaps on
Linux 6.18); XLA's allocator gives ours 4 KiB pages, since transparent huge pages are usually on
`madvise` only. So `place` copies a large host array into an anonymous mapping advised
MADV_HUGEPAGE before its first touch, and lets the JAX array alias it (`device_put(may_alias=True)`
on the CPU backend is zero-copy; the array keeps the mapping alive). Measured on Zen 5 in
BENCHMARKS.md, "Zen 5 machine, fourth session".

Anything but a Linux CPU backend with huge pages available, or `MIXTRAL_JAX_HUGE_PAGES=0`, gets
`jnp.asarray`'s copy as before; so do arrays under 2 MiB.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

ENV = "MIXTRAL_JAX_HUGE_PAGES"
HUGE_PAGE = 2 << 20
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


@functools.cache
def available() -> bool:
    """Whether `place` maps arrays in huge pages in this process (logged once)."""
    if os.environ.get(ENV, "1") == "0":
        why = f"{ENV}=0"
    elif not hasattr(mmap, "MADV_HUGEPAGE"):
        why = "no MADV_HUGEPAGE on this platform"
    elif jax.default_backend() != "cpu":
        why = f"the {jax.default_backend()} backend keeps weights in its own memory"
    else:
        try:
            with open(THP_SETTING) as f:
                setting = f.read()
        except OSError:
            setting = "[never]"
        why = "transparent huge pages are off" if "[never]" in setting else ""
    if why:
        log.debug("weights in XLA's own host buffers: %s", why)
        return False
    log.info("weights in transparent huge pages (%s=0 turns this off)", ENV)
    return True


def place(a) -> jax.Array:
    """`a` (a host or JAX array) on the default device; in huge pages where `available()` and it
    spans at least one."""
    if a.nbytes < HUGE_PAGE or not available():
        return jnp.asarray(a)
    a = np.asarray(a)
    # A whole number of huge pages: Linux aligns such anonymous maps to a huge page (6.7 and
    # later); elsewhere the pages inside the map that are aligned still become huge.
    size = -(-a.nbytes // HUGE_PAGE) * HUGE_PAGE
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    buffer = np.frombuffer(region, a.dtype, count=a.size).reshape(a.shape)
    buffer[...] = a
    return jax.device_put(buffer, may_alias=True)
