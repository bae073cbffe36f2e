"""One MoE layer of the `small` config: every dispatch strategy against its bounds.

For T = 1, 8, 128, 512 tokens (float32, one device, split per-expert weights, median of 5 after a
warm-up) prints each strategy's time next to
- the read bound: bytes of the distinct experts the tokens select / measured read bandwidth;
- the compute bound: useful FLOPs (top-k experts per token) / measured float32 matmul peak.
Every strategy is checked against the dense oracle first.

    python benchmarks/moe_layer.py [--json]
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    config = mj.MixtralConfig.small()
    probes = machine_probes()
    layer = split_layer(mj.init_params(config.replace(n_layers=1), seed=0)["layers_0"])
    expert_bytes = 3 * config.d_model * config.d_ff * 4
    rows = []
    for t in (1, 8, 128, 512):
        x = jnp.asarray(np.random.default_rng(t).standard_normal((t, config.d_model)), jnp.float32)
        n_selected = len(np.unique(np.asarray(moe.route(x, layer["router"], config.top_k).experts)))
        read_bound = n_selected * expert_bytes / probes["read_bandwidth"]
        compute_bound = 2 * t * config.top_k * expert_bytes / 4 / probes["matmul_peak"]
        ref = None
        for strategy in STRATEGIES:
            if strategy == "gather" and t * config.top_k > 2 * config.n_experts:
                continue  # one switch per (token, slot): meant for decode-sized inputs
            # weights are arguments, not closed-over constants (XLA would constant-fold them)
            f = jax.jit(lambda x, w, s=strategy: moe.moe(x, w, top_k=config.top_k, strategy=s)[0])
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
                         "compute_bound_ms": compute_bound * 1e3, "experts_selected": n_selected,
                         "x_read_bound": s / read_bound, "x_bound": s / max(read_bound, compute_bound)})
    report(args.json, probes, rows, "small config, one layer, float32",
           [("tokens", "T", 4, "d"), ("strategy", "strategy", 8, "s"), ("ms", "ms", 9, ".2f"),
            ("read_bound_ms", "read bound", 11, ".2f"), ("compute_bound_ms", "compute bound", 14, ".2f"),
            ("x_bound", "x max(bound)", 13, ".2f")])

if __name__ == "__main__":
    main()
