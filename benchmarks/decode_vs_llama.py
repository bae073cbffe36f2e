"""Batch-1 decode, ours against llama.cpp's, in alternating rounds (BENCHMARKS.md, "AVX2 machine").

`mixtral-jax bench --llama-bench PATH` measures each system once, one after the other; on a shared
host whose speed moves 10-50% between minutes that order can decide a ratio. This script builds the
same random `small` weights and GGUF exports as the bench and then alternates, round by round: our
decode child for each weight type (its own process, as the bench runs it), then `llama-bench`
decoding the matching GGUF type. It prints each round's tok/s and the ratios of the medians.

    python benchmarks/decode_vs_llama.py --llama-bench PATH [--rounds 3] [--pairs int8:q8_0,float32:f32]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from mixtral_jax import bench
from mixtral_jax.config import MixtralConfig

PAIRS = {"int8": "q8_0", "float32": "f32", "bfloat16": "f16"}


def ours(ckpt: str, weight_type: str) -> float:
    dtype, quantize = bench.DECODE_PATHS[weight_type]
    cmd = [sys.executable, "-m", "mixtral_jax.bench", "--decode-child", ckpt, dtype, quantize or "none", "3"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])["1"]


def theirs(llama_bench: str, gguf: str) -> float:
    cmd = [llama_bench, "-m", gguf, "-p", "0", "-n", str(bench.LLAMA_DECODE_TOKENS), "-t", str(os.cpu_count()),
           "-r", "3", "-o", "json"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=True)
    return float(json.loads(run.stdout)[0]["avg_ts"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-bench", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", default="int8:q8_0,float32:f32",
                        help="ours:theirs weight types, comma-separated (ours: float32, bfloat16, int8)")
    args = parser.parse_args()
    pairs = [tuple(p.split(":")) for p in args.pairs.split(",")]
    if args.rounds < 1 or any(len(p) != 2 or p[0] not in PAIRS or p[1] not in bench.LLAMA_TYPES for p in pairs):
        parser.error(f"--rounds >= 1 and --pairs from {PAIRS} (theirs one of {bench.LLAMA_TYPES})")
    if not (os.path.isfile(args.llama_bench) and os.access(args.llama_bench, os.X_OK)):
        parser.error(f"--llama-bench {args.llama_bench}: not an executable file")
    from mixtral_convert.gguf_export import export_gguf

    def body(_hf, ckpt):
        with tempfile.TemporaryDirectory(prefix="mixtral-jax-gguf-") as tmp:
            ggufs = {}
            for _, kind in pairs:
                ggufs[kind] = os.path.join(tmp, f"{kind}.gguf")
                export_gguf(ckpt, ggufs[kind], gguf_type=kind)
            rates = {p: ([], []) for p in pairs}
            for r in range(args.rounds):
                for ours_type, kind in pairs:
                    a, b = ours(ckpt, ours_type), theirs(args.llama_bench, ggufs[kind])
                    rates[(ours_type, kind)][0].append(a)
                    rates[(ours_type, kind)][1].append(b)
                    print(f"round {r + 1}: ours {ours_type} {a:.1f} tok/s, llama.cpp {kind} {b:.1f} tok/s", flush=True)
            for (ours_type, kind), (a, b) in rates.items():
                ma, mb = statistics.median(a), statistics.median(b)
                print(f"{ours_type} vs {kind}: medians {ma:.1f} / {mb:.1f} tok/s = {ma / mb:.2f}x; "
                      f"per round {', '.join(f'{x / y:.2f}x' for x, y in zip(a, b))}")

    bench._with_checkpoints(MixtralConfig.small(), 0, body)


if __name__ == "__main__":
    main()
