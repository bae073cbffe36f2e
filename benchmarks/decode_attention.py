"""Decode attention, one layer: the blockwise loop against the CPU kernel (`mj_attend`), side by side
in one process, over a cache of `--cache` slots per row (a server's rows are 32k long) with rows
filled to random lengths up to each `--lengths` value; the small config's heads (N=16, K=4, H=64).

    python benchmarks/decode_attention.py [--rows 1,8] [--lengths 100,300,700,4000] [--cache 32768]
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax import attention, kernels

sys.path.insert(0, os.path.dirname(__file__))
from long_attention import median_time  # noqa: E402


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of positive integers (argparse turns the error into a usage line)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=positive_ints, default="1,8")
    parser.add_argument("--lengths", type=positive_ints, default="100,300,700,4000")
    parser.add_argument("--cache", type=int, default=32768)
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    if args.cache < 1 or args.calls < 1:
        parser.error("--cache and --calls must be at least 1")
    if max(args.lengths) > args.cache:
        parser.error(f"--lengths go up to {max(args.lengths)}, beyond --cache {args.cache}")
    print(kernels.status())
    n_heads, kv_heads, head_dim = 16, 4, 64
    rng = np.random.default_rng(0)
    blockwise = jax.jit(lambda q, k, v, p, n: attention.blockwise_attention(q, k, v, p, n))
    kernel = jax.jit(lambda q, k, v, p, n: attention.decode_kernel(q, k, v, p, n))
    for b in args.rows:
        k, v = (jnp.asarray(rng.standard_normal((b, args.cache, kv_heads, head_dim)), jnp.float32) for _ in range(2))
        q = jnp.asarray(rng.standard_normal((b, 1, n_heads, head_dim)), jnp.float32)
        for top in args.lengths:
            kv_len = jnp.asarray(rng.integers(top // 2, top + 1, b), jnp.int32)
            call = (q, k, v, (kv_len - 1)[:, None], kv_len)
            err = float(np.abs(np.asarray(blockwise(*call)) - np.asarray(kernel(*call))).max())
            # alternate the two, twice each, and keep each one's best median
            t_b, t_k = [], []
            for _ in range(2):
                t_b.append(median_time(blockwise, call, args.calls) * 1e3)
                t_k.append(median_time(kernel, call, args.calls) * 1e3)
            print(f"rows {b}, lengths {top // 2}-{top}: blockwise {min(t_b):.3f} ms, kernel {min(t_k):.3f} ms, "
                  f"{min(t_b) / min(t_k):.1f}x (max difference {err:.1e})", flush=True)


if __name__ == "__main__":
    main()
