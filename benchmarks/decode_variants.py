"""Batch-1 decode variants side by side in one process (BENCHMARKS.md, "AVX2 machine"): which
matrix products take the CPU kernels, and an int8 model with lm_head in three dtypes.

    python benchmarks/decode_variants.py [--rounds 4]

1. A 16-step decoder loop (decoder + lm_head + argmax, no sampling) on a random `small` float32
   model, traced four ways: every product on the kernels ("on"), none ("off"), only the MoE layers
   ("moe-only"), only the projections and lm_head ("linear-only"); ms per step, rounds alternating.
2. `generate`'s batch-1 decode of the same weights in int8 (`load(quantize="int8")`, lm_head in
   bfloat16), with lm_head in float32 (what `load` kept before) and with lm_head quantized as well
   (in memory, one scale per vocabulary entry: what llama.cpp's q8_0 export does; not what `load`
   does), tok/s, rounds alternating.
"""

import argparse
import dataclasses
import functools
import tempfile
import time

import jax
import numpy as np

from mixtral_jax import bench, checkpoint, kernels, quant
from mixtral_jax.config import MixtralConfig
from mixtral_jax.model import init_params
from mixtral_jax.sampler import generate

from cpu_kernels import STEPS, loop_args, loop_decode  # benchmarks/, this script's folder

VARIANTS = ("on", "off", "moe-only", "linear-only")


def choose(variant, fits):
    """`kernels.fits` restricted to the variant (the MoE layer asks with `moe_max_rows()`)."""
    def restricted(rows, *weights, mesh=None, max_rows=kernels.MAX_ROWS):
        is_moe = max_rows != kernels.MAX_ROWS
        if variant == "off" or (variant == "moe-only" and not is_moe) or (variant == "linear-only" and is_moe):
            return False
        return fits(rows, *weights, mesh=mesh, max_rows=max_rows)
    return restricted


def kernel_mix(model, rounds):
    c, p = model.config, model.params
    args = functools.partial(loop_args, c, p)
    fits, programs = kernels.fits, {}
    try:
        for variant in VARIANTS:  # the choice is made while tracing
            kernels.fits = choose(variant, fits)
            programs[variant] = jax.jit(functools.partial(loop_decode, c), donate_argnums=1)
            jax.block_until_ready(programs[variant](*args()))
    finally:
        kernels.fits = fits
    times = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for variant, run in programs.items():
            best = float("inf")
            for _ in range(2):
                a = args()
                start = time.perf_counter()
                jax.block_until_ready(run(*a))
                best = min(best, time.perf_counter() - start)
            times[variant].append(best / STEPS * 1e3)
    for variant, t in times.items():
        print(f"float32 decoder loop, kernels {variant}: {' '.join(f'{x:.1f}' for x in t)} ms per step "
              f"(median {np.median(t):.1f})")


def head_in_int8(path, rounds):
    shipped = checkpoint.load(path, quantize="int8")
    head = jax.numpy.asarray(checkpoint.restore_item(path, shipped.config, "globals", np.float32)["lm_head"])

    def with_head(w):
        return dataclasses.replace(shipped, params={**shipped.params, "lm_head": w})
    prompt = [np.random.default_rng(0).integers(3, shipped.config.vocab_size, 16).tolist()]

    def step(model):
        return bench.step_time(lambda: generate(model, prompt, max_new_tokens=1, stop_tokens=[]),
                               lambda: generate(model, prompt, max_new_tokens=bench.DECODE_TOKENS + 1, stop_tokens=[]),
                               bench.DECODE_TOKENS, 3)

    models = {"lm_head bfloat16 (as shipped)": shipped, "lm_head float32 (as before)": with_head(head),
              "lm_head int8 (experiment)": with_head(quant.quantize_int8(head, (0,)))}
    del head
    rates = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            rates[name].append(1 / step(model))
    for name, r in rates.items():
        print(f"int8 decode batch 1, {name}: {' '.join(f'{x:.1f}' for x in r)} tok/s (median {np.median(r):.1f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    print(kernels.status())
    config = MixtralConfig.small()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.save(f"{tmp}/ckpt", config, init_params(config, seed=0))
        kernel_mix(checkpoint.load(f"{tmp}/ckpt"), args.rounds)
        head_in_int8(f"{tmp}/ckpt", args.rounds)


if __name__ == "__main__":
    main()
