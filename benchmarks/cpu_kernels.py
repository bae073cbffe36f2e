"""CPU decode kernels beside XLA, and where a float32 decode step's time goes (BENCHMARKS.md,
"CPU decode kernels").

    python benchmarks/cpu_kernels.py [--quantize int8] [--no-gemv]

1. Matrix-vector products over ~1 GB of weights (so nothing is served from L3), lm_head- and
   attention-shaped: XLA's float32 dot vs the kernels' [in, out] loop with float32, int8 and
   bfloat16 weights, 1 and 8 rows.
2. On a random `small` model: a `generate` decode step, the decoder + lm_head + argmax alone (16
   steps in one jitted loop), the kernels alone on the same weights, and the step's bytes at the
   best read probe; then the kernels by part (attention projections, MoE, lm_head, all).
   Everything in one process, side by side. `--quantize int8` loads that model in int8 (as
   `load(quantize="int8")` does: lm_head in bfloat16); `--no-gemv` skips part 1.
"""

import argparse
import functools
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax import bench, checkpoint, kernels, quant
from mixtral_jax.config import MixtralConfig
from mixtral_jax.kvcache import init_cache
from mixtral_jax.model import decoder, init_params, lm_head
from mixtral_jax.moe import Routing, moe_kernel
from mixtral_jax.sampler import generate

STEPS = 16
PARTS = ("attention", "moe", "lm_head")


def best(fn, *args, n=5):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / n)
    return min(times)


def gemv():
    rng = np.random.default_rng(0)
    # lm_head-shaped and attention-projection-shaped [in, out] weights, 1 GB of each.
    for k, n, reps in ((1024, 32000, 8), (1024, 1024, 256)):
        ws = [jnp.asarray(rng.standard_normal((k, n)), jnp.float32) for _ in range(reps)]
        nbytes = k * n * 4 * reps
        for rows in (1, 8):
            x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
            xla = jax.jit(lambda x, ws: sum(x @ w for w in ws))
            ker = jax.jit(lambda x, ws: sum(kernels.linear(x, w) for w in ws))
            t_xla, t_f32 = best(xla, x, ws), best(ker, x, ws)
            t_i8 = best(ker, x, [quant.quantize_int8(w, (0,)) for w in ws])
            t_bf16 = best(ker, x, [w.astype(jnp.bfloat16) for w in ws])
            print(f"{rows} rows, {reps} x [{k}, {n}] float32 [in, out]: XLA f32 {nbytes / t_xla / 1e9:.1f} GB/s, "
                  f"kernel f32 {nbytes / t_f32 / 1e9:.1f} GB/s; speed vs XLA f32: int8 {t_xla / t_i8:.2f}x, "
                  f"bf16 {t_xla / t_bf16:.2f}x")
        del ws


def loop_decode(c, p, cache, tok):
    """STEPS batch-1 greedy steps of the decoder, lm_head and argmax alone (no sampling)."""
    def body(i, state):
        cache, tok = state
        h, cache, _, _ = decoder(c, p, tok[:, None], None, cache)
        return cache, jnp.argmax(lm_head(p, h[:, 0]), -1).astype(jnp.int32)
    return jax.lax.fori_loop(0, STEPS, body, (cache, tok))


def loop_args(c, p):
    """`loop_decode`'s inputs: the parameters, a fresh cache holding 5 positions and a first token
    (the cache is donated, so each call needs its own)."""
    return p, dict(init_cache(c, 1, 64), lengths=jnp.array([5], jnp.int32)), jnp.array([7], jnp.int32)


def part_bytes(c, p) -> dict[str, int]:
    """Bytes a batch-1 step's kernels read, by part (plain or int8 weights; two experts a layer)."""
    def nbytes(tree):
        return sum(a.nbytes for a in jax.tree.leaves(tree))
    layers = [p[f"layers_{i}"] for i in range(c.n_layers)]
    return {"attention": sum(nbytes(l[w]) for l in layers for w in ("wq", "wk", "wv", "wo")),
            "moe": sum(2 * nbytes(l[w][0]) for l in layers for w in ("w_gate", "w_up", "w_down")),
            "lm_head": p["lm_head"].nbytes}


def decode_breakdown(quantize=None):
    config = MixtralConfig.small()
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/ckpt"
        checkpoint.save(path, config, init_params(config, seed=0))
        model = checkpoint.load(path, quantize=quantize)
    c, p = model.config, model.params

    def per_step(fn, make_args):
        jax.block_until_ready(fn(*make_args()))
        times = []
        for _ in range(4):
            args = make_args()
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - start)
        return min(times) / STEPS

    t_loop = per_step(jax.jit(functools.partial(loop_decode, c), donate_argnums=1),
                      functools.partial(loop_args, c, p))
    t_kernels = per_step(jax.jit(functools.partial(kernel_steps, c, parts=PARTS)),
                         lambda: (p, jnp.ones((1, c.d_model)) * 0.01))
    prompts = [[5] * 16]
    t_gen = bench.step_time(lambda: generate(model, prompts, max_new_tokens=1, stop_tokens=[]),
                            lambda: generate(model, prompts, max_new_tokens=STEPS + 1, stop_tokens=[]), STEPS, 3)
    probe = bench.machine_probes()["read_bandwidth"]
    nbytes = sum(part_bytes(c, p).values())
    print(f"small {quantize or 'float32'}, batch 1 ({kernels.status()}): generate step {t_gen * 1e3:.1f} ms | "
          f"decoder + lm_head + argmax "
          f"{t_loop * 1e3:.1f} ms | kernels alone {t_kernels * 1e3:.1f} ms | {nbytes / 1e6:.0f} MB at the best "
          f"probe ({probe / 1e9:.1f} GB/s) {nbytes / probe * 1e3:.1f} ms")
    decode_parts(c, p, t_kernels)


def kernel_steps(c, p, x, *, parts):
    """STEPS batch-1 steps of the decode kernels alone, in step order, on `parts` of PARTS (the
    experts vary from step to step)."""
    def body(i, x):
        for li in range(c.n_layers):
            layer = p[f"layers_{li}"]
            if "attention" in parts:
                q, k, v = (kernels.linear(x, layer[w], nk=True) for w in ("wq", "wk", "wv"))  # [out, in]
                x = x + 1e-3 * kernels.linear(q, layer["wo"], nk=True) + 1e-3 * (k.sum() + v.sum())
            if "moe" in parts:
                e = (jnp.abs(x[0, :2] * 1000).astype(jnp.int32) + i) % c.n_experts  # varying experts
                experts = jnp.stack([e[0], (e[0] + 1 + e[1] % 7) % 8])[None].astype(jnp.int32)
                routing = Routing(jnp.zeros((1, c.n_experts)), jnp.array([[0.5, 0.5]]), experts)
                x = x + 1e-3 * moe_kernel(x, routing, jnp.ones((1,), bool),
                                          (layer["w_gate"], layer["w_up"], layer["w_down"]))
        if "lm_head" in parts:
            x = x + 1e-6 * kernels.linear(x, p["lm_head"])[:, :c.d_model]
        return x
    return jax.lax.fori_loop(0, STEPS, body, x)


def decode_parts(c, p, t_all):
    """The kernels of a batch-1 step by part (attention projections of every layer, the MoE layers
    with two experts each, lm_head) beside all of them in step order (`t_all`, per step). Alone,
    the attention projections and lm_head (~215 MB) can be served from a large L3; in a step, the
    MoE's stream evicts them."""
    nbytes = part_bytes(c, p)
    x = jnp.ones((1, c.d_model)) * 0.01
    times = {(part,): best(jax.jit(functools.partial(kernel_steps, c, parts=(part,))), p, x, n=2) / STEPS
             for part in PARTS}
    times[PARTS] = t_all
    for parts, t in times.items():
        b = sum(nbytes[part] for part in parts)
        print(f"  kernels, {' + '.join(parts)}: {t * 1e3:.2f} ms per step, {b / 1e6:.0f} MB, {b / t / 1e9:.1f} GB/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quantize", choices=["int8"])
    parser.add_argument("--no-gemv", action="store_true")
    args = parser.parse_args()
    if not args.no_gemv:
        gemv()
    decode_breakdown(args.quantize)
