"""Attention at long context, one layer, side by side in one run (BENCHMARKS.md, long context).

- prefill (T = S) of 8k and 16k tokens: blockwise with and without key-block skipping; how time
  grows from 8k to 16k, and what skipping saves;
- decode (T = 1) over a 32,768-slot cache filled to 1,000 and to 32,000 positions;
- compiled temp bytes at 8k and 32k (blockwise) and at 2k and 8k (materialised).

Heads of the `small` config (N=16, K=4, H=64), float32, batch 1; medians of --runs.

    python benchmarks/long_attention.py [--runs 3] [--json]
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.attention import Chunk, attend, blockwise_attention

N, K, H = 16, 4, 64


def inputs(t, s, filled):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, t, N, H)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, s, K, H)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, s, K, H)), jnp.float32)
    q_pos = jnp.asarray(np.arange(filled - t, filled)[None], jnp.int32)
    return q, k, v, q_pos, jnp.asarray([filled], jnp.int32)


def median_time(fn, args, runs):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def temp_bytes(name, t):
    q = jax.ShapeDtypeStruct((1, t, N, H), np.float32)
    kv = jax.ShapeDtypeStruct((1, t, K, H), np.float32)
    pos, n = jax.ShapeDtypeStruct((1, t), np.int32), jax.ShapeDtypeStruct((1,), np.int32)
    fn = jax.jit(lambda q, k, v, p, n: attend(name, q, k, v, p, n, Chunk(k, v, n, None)))
    return fn.lower(q, kv, kv, pos, n).compile().memory_analysis().temp_size_in_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    skip = jax.jit(lambda *a: blockwise_attention(*a, skip=True))
    full = jax.jit(lambda *a: blockwise_attention(*a, skip=False))
    r = {"prefill_s": {}, "decode_s": {}, "temp_bytes": {}}
    for t in (8192, 16384):
        x = inputs(t, t, t)
        r["prefill_s"][t] = {"skip": median_time(skip, x, args.runs), "no_skip": median_time(full, x, args.runs)}
    for filled in (1000, 32000):
        r["decode_s"][filled] = median_time(skip, inputs(1, 32768, filled), max(args.runs, 5))
    r["temp_bytes"] = {"blockwise": {t: temp_bytes("blockwise", t) for t in (8192, 32768)},
                       "materialized": {t: temp_bytes("materialized", t) for t in (2048, 8192)}}
    p = r["prefill_s"]
    r["ratios"] = {
        "prefill_16k_over_8k_skip": p[16384]["skip"] / p[8192]["skip"],
        "prefill_16k_over_8k_no_skip": p[16384]["no_skip"] / p[8192]["no_skip"],
        "skip_saves_8k": 1 - p[8192]["skip"] / p[8192]["no_skip"],
        "skip_saves_16k": 1 - p[16384]["skip"] / p[16384]["no_skip"],
        "decode_1000_over_32000": r["decode_s"][1000] / r["decode_s"][32000],
        "temp_32k_over_8k_blockwise": r["temp_bytes"]["blockwise"][32768] / r["temp_bytes"]["blockwise"][8192],
        "temp_8k_over_2k_materialized": r["temp_bytes"]["materialized"][8192] / r["temp_bytes"]["materialized"][2048],
    }
    if args.json:
        print(json.dumps(r))
        return
    print(f"one attention layer, N={N} K={K} H={H}, float32, batch 1, median of {args.runs}")
    for t, x in p.items():
        print(f"prefill {t:>6}: skip {x['skip']:.3f} s, no skip {x['no_skip']:.3f} s")
    for filled, sec in r["decode_s"].items():
        print(f"decode at position {filled:>6} of a 32768-slot cache: {sec * 1e3:.2f} ms")
    for name, d in r["temp_bytes"].items():
        print(f"compiled temp bytes, {name}: " + ", ".join(f"{t}: {b / 1e6:.1f} MB" for t, b in d.items()))
    for k, v in r["ratios"].items():
        print(f"{k}: {v:.3f}")


if __name__ == "__main__":
    main()
