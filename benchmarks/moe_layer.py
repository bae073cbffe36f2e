"""One MoE layer of the `small` config: every dispatch strategy against its bounds.

For T = 1, 8, 128, 512 tokens (or --tokens; float32, one device, split per-expert weights, median
of 5 after a warm-up) prints each strategy's time next to
- the read bound: bytes of the distinct experts the tokens select / measured read bandwidth;
- the compute bound: useful FLOPs (top-k experts per token) / measured float32 matmul peak;
- `sorted`'s step count: sum over experts of ceil(assignments / rows per step), the steps of
  `sorted_chunk` rows it runs (each the same cost whatever its rows hold).
Every strategy is checked against the dense oracle first. `kernel` calls the CPU kernel directly,
also above the row count `auto` gives it (to see where it stops paying); it needs the kernels built.

    python benchmarks/moe_layer.py [--tokens 1,8,128,512] [--strategies dense,gather,einsum,sorted] [--json]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import mixtral_jax as mj
from mixtral_jax import moe
from mixtral_jax.bench import machine_probes
from mixtral_jax.model import split_layer

from measure import report

STRATEGIES = ("dense", "gather", "einsum", "sorted")


def layer_fn(strategy, top_k):
    if strategy == "kernel":
        def f(x, layer):
            routing = moe.route(x, layer["router"], top_k)
            weights = (layer["w_gate"], layer["w_up"], layer["w_down"])
            return moe.moe_kernel(x, routing, jnp.ones(x.shape[:1], bool), weights)
        return f
    return lambda x, layer: moe.moe(x, layer, top_k=top_k, strategy=strategy)[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,8,128,512", help="comma-separated token counts")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help=f"comma-separated, from {', '.join(moe.STRATEGIES)}")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        token_counts = [int(t) for t in args.tokens.split(",")]
        strategies = args.strategies.split(",")
        if any(t < 1 for t in token_counts) or not set(strategies) <= set(moe.STRATEGIES):
            raise ValueError
    except ValueError:
        parser.error(f"--tokens takes positive integers and --strategies names from {', '.join(moe.STRATEGIES)}")
    config = mj.MixtralConfig.small()
    probes = machine_probes()
    layer = split_layer(mj.init_params(config.replace(n_layers=1), seed=0)["layers_0"])
    expert_bytes = 3 * config.d_model * config.d_ff * 4
    rows = []
    for t in token_counts:
        x = jnp.asarray(np.random.default_rng(t).standard_normal((t, config.d_model)), jnp.float32)
        chosen = np.asarray(moe.route(x, layer["router"], config.top_k).experts)
        n_selected = len(np.unique(chosen))
        rows_per_step = moe.sorted_chunk(t, config.n_experts, config.top_k)
        sorted_steps = int(sum(-(-c // rows_per_step) for c in np.bincount(chosen.ravel(), minlength=config.n_experts)))
        read_bound = n_selected * expert_bytes / probes["read_bandwidth"]
        compute_bound = 2 * t * config.top_k * expert_bytes / 4 / probes["matmul_peak"]
        ref = None
        for strategy in strategies:
            if strategy == "gather" and t * config.top_k > 2 * config.n_experts:
                continue  # one switch per (token, slot): meant for decode-sized inputs
            # weights are arguments, not closed-over constants (XLA would constant-fold them)
            f = jax.jit(layer_fn(strategy, config.top_k))
            y = f(x, layer).block_until_ready()
            ref = y if ref is None else ref
            np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-4)
            times = []
            for _ in range(5):
                start = time.perf_counter()
                f(x, layer).block_until_ready()
                times.append(time.perf_counter() - start)
            s = statistics.median(times)
            rows.append({"tokens": t, "strategy": strategy, "ms": s * 1e3, "read_bound_ms": read_bound * 1e3,
                         "compute_bound_ms": compute_bound * 1e3, "experts_selected": n_selected, "sorted_steps": sorted_steps,
                         "x_read_bound": s / read_bound, "x_bound": s / max(read_bound, compute_bound)})
    report(args.json, probes, rows, "small config, one layer, float32",
           [("tokens", "T", 4, "d"), ("strategy", "strategy", 8, "s"), ("ms", "ms", 9, ".2f"),
            ("read_bound_ms", "read bound", 11, ".2f"), ("compute_bound_ms", "compute bound", 14, ".2f"),
            ("x_bound", "x max(bound)", 13, ".2f"), ("sorted_steps", "sorted steps", 13, "d")])

if __name__ == "__main__":
    main()
