"""Why the CPU layout stores expert matrices as [out, in]: XLA's CPU matmul time by orientation.

For one small-config expert matrix (D=1024 in, F=3584 out, float32) and M activation rows, times
(best of 3 passes over 12 distinct matrices, so weights come from memory, not cache):
- `x @ W`       [M, D] x [D, F] -> [M, F]   (the canonical x @ W layout)
- `W^T x^T`     [F, D] x [M, D] -> [F, M]   (weight as the left operand, [out, in] storage)
next to the read bound (matrix bytes / measured read bandwidth) and the compute bound.

    python benchmarks/matmul_forms.py [--json]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.bench import machine_probes

from measure import report

D, F, MATRICES = 1024, 3584, 12
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 512)


def cold_ms(fn, weights, x) -> float:
    """Best of 3 passes of the mean time per matrix, cycling through `weights` (> L3 in total)."""
    for w in weights:
        fn(x, w).block_until_ready()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for w in weights:
            out = fn(x, w)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - start) / len(weights))
    return best * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    probes = machine_probes()
    rng = np.random.default_rng(0)
    canonical = [jnp.asarray(rng.standard_normal((D, F), dtype=np.float32)) for _ in range(MATRICES)]
    out_in = [w.T.copy() for w in canonical]
    x_at_w = jax.jit(lambda x, w: jnp.einsum("md,df->mf", x, w))       # [M, F]
    w_first = jax.jit(lambda x, w: jnp.einsum("fd,md->fm", w, x))      # [F, M]
    read_bound = D * F * 4 / probes["read_bandwidth"] * 1e3
    rows = []
    for m in ROWS:
        x = jnp.asarray(rng.standard_normal((m, D), dtype=np.float32))
        rows.append({"rows": m, "x_at_w_ms": cold_ms(x_at_w, canonical, x),
                     "w_first_ms": cold_ms(w_first, out_in, x), "read_bound_ms": read_bound,
                     "compute_bound_ms": 2 * m * D * F / probes["matmul_peak"] * 1e3})
    report(args.json, probes, rows, f"[M, {D}] x [{D}, {F}] float32, cold weights",
           [("rows", "M", 4, "d"), ("x_at_w_ms", "x @ W ms", 9, ".2f"), ("w_first_ms", "W^T x^T ms", 11, ".2f"),
            ("read_bound_ms", "read bound", 11, ".2f"), ("compute_bound_ms", "compute bound", 14, ".2f")])

if __name__ == "__main__":
    main()
