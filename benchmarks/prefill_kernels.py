"""Prefill of a 512-token prompt with the CPU kernels on and off, for each weight type, alternating.

Issue 16 keeps prefill on its XLA path except where the kernels are faster: the MoE layer of a
prompt chunk up to `kernels.MOE_MAX_ROWS` tokens runs on the kernel's register-blocked panels, for
float32, bfloat16 and int8 weights alike. This script checks that against the pure-JAX path on the
same random `small` weights: each round, for each weight type, `generate` (prefill and one token,
median of 3 after a warm-up; `decode_vs_llama.py --prefill-child CKPT TYPE`) in a child process with
MIXTRAL_JAX_CPU_KERNELS=1, then one with =0 (the kernel choice is made when a program is traced).
It prints each child's tok/s and, per weight type, the ratio of the medians and of each round.

    python benchmarks/prefill_kernels.py [--rounds 3] [--types int8,bfloat16,float32]
"""

import argparse
import os
import statistics

from decode_vs_llama import ours_prefill  # this folder's script, whose prefill child runs here
from mixtral_jax import bench, kernels
from mixtral_jax.config import MixtralConfig


def run_child(ckpt: str, weight_type: str, on: bool) -> float:
    """Prefill tok/s in a child process (decode_vs_llama.py's) with the kernels on or off."""
    return ours_prefill(ckpt, weight_type, dict(os.environ, **{kernels.ENV: "1" if on else "0"}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--types", default="int8,bfloat16,float32",
                        help=f"weight types, comma-separated, from {list(bench.DECODE_PATHS)}")
    args = parser.parse_args()
    types = args.types.split(",")
    if args.rounds < 1 or any(t not in bench.DECODE_PATHS for t in types):
        parser.error(f"--rounds >= 1 and --types from {list(bench.DECODE_PATHS)}")
    print(f"kernels: {kernels.status()}", flush=True)

    def body(_hf, ckpt):
        rates = {t: ([], []) for t in types}
        for r in range(args.rounds):
            for t in types:
                on, off = run_child(ckpt, t, True), run_child(ckpt, t, False)
                rates[t][0].append(on)
                rates[t][1].append(off)
                print(f"round {r + 1}: {t} prefill {on:.1f} tok/s kernels on, {off:.1f} off", flush=True)
        for t, (on, off) in rates.items():
            a, b = statistics.median(on), statistics.median(off)
            print(f"{t}: medians {a:.1f} / {b:.1f} tok/s = {a / b:.2f}x kernels on/off; "
                  f"per round {', '.join(f'{x / y:.2f}x' for x, y in zip(on, off))}")

    bench._with_checkpoints(MixtralConfig.small(), 0, body)


if __name__ == "__main__":
    main()
