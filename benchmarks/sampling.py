"""Sampling cost on XLA:CPU: the vocabulary sort, float32 keys vs `sampler.sort_floats`' int32 keys,
and `sampler.sample` per setting (README "Generating text", Semantics). One process, side by side.

    python benchmarks/sampling.py [--rows 8] [--vocab 32000]
"""

import argparse
import time

import jax
import jax.numpy as jnp

from mixtral_jax import sampler


def per_call(fn, *args, n=20):
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / n)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    n, v = args.rows, args.vocab
    logits = jax.random.normal(jax.random.key(0), (n, v)) * 3
    t_float = per_call(jax.jit(lambda x: jnp.sort(x, axis=-1)), logits)
    t_int = per_call(jax.jit(sampler.sort_floats), logits)
    print(f"sort [{n}, {v}]: float32 keys {t_float * 1e3:.1f} ms, int32 keys (sort_floats) {t_int * 1e3:.1f} ms "
          f"({t_float / t_int:.1f}x)")
    keys = jax.random.split(jax.random.key(1), n)
    sample = jax.jit(lambda x, p: sampler.sample(x, p, keys))
    for name, (temperature, top_k, top_p) in {"greedy": (0.0, 0, 1.0), "temperature 1": (1.0, 0, 1.0),
                                               "temperature 0.7, top_p 0.9": (0.7, 0, 0.9),
                                               "top_k 50, top_p 0.9": (1.0, 50, 0.9)}.items():
        p = sampler.SamplingParams(jnp.full((n,), temperature), jnp.full((n,), top_k, jnp.int32),
                                   jnp.full((n,), top_p), jnp.zeros((n,)), jnp.ones((n,)), jnp.zeros((n,)),
                                   jnp.zeros((n,)))
        print(f"sample [{n}, {v}], {name}: {per_call(sample, logits, p) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
