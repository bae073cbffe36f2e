"""Batch-1 decode, ours against llama.cpp's, in alternating rounds (BENCHMARKS.md, "AVX2 machine").

`mixtral-jax bench --llama-bench PATH` measures each system once, one after the other; on a shared
host whose speed moves 10-50% between minutes that order can decide a ratio. This script builds the
same random `small` weights and GGUF exports as the bench and then alternates, round by round: our
decode child for each weight type (its own process, as the bench runs it), then `llama-bench`
decoding the matching GGUF type. It prints each round's tok/s and the ratios of the medians.

`--interleaved` makes the decode rounds short: one process of ours stays loaded and compiled for
each weight type, and each round is one timing of LLAMA_DECODE_TOKENS steps by it beside one
`llama-bench -r 1` run of as many tokens (a few seconds each), so a round's two figures come from
the same phase of the host. It prints the median and quartiles of the per-round ratios.

`--prefill` alternates prefill of a 512-token prompt instead (issue 16's prefill target): our
float32 `generate` (prefill and one token, median of 3 after a warm-up, in a child process) against
`llama-bench -p 512` on every GGUF type of the pairs, each round's ratio taken against llama.cpp's
best type in that round.

    python benchmarks/decode_vs_llama.py --llama-bench PATH [--rounds 3] [--pairs int8:q8_0,float32:f32]
    python benchmarks/decode_vs_llama.py --llama-bench PATH --interleaved [--rounds 30] [--pairs float32:f32]
    python benchmarks/decode_vs_llama.py --llama-bench PATH --prefill [--rounds 3] [--pairs float32:f32,...]
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


def theirs(llama_bench: str, gguf: str, runs: int = 3) -> float:
    return bench.llama_bench_rows(llama_bench, {"model": gguf}, 0, bench.LLAMA_DECODE_TOKENS, runs)[0][2]


def decode_server(ckpt: str, weight_type: str) -> None:
    """Loads and compiles once, prints "ready", then answers each line of stdin with one batch-1
    decode rate (tok/s): LLAMA_DECODE_TOKENS steps of `generate`, less a one-token call (the
    bench's `step_time` over one pair)."""
    import numpy as np

    from mixtral_jax import checkpoint
    from mixtral_jax.sampler import generate

    dtype, quantize = bench.DECODE_PATHS[weight_type]
    model = checkpoint.load(ckpt, dtype=dtype, quantize=quantize)
    prompt = [np.random.default_rng(0).integers(3, model.config.vocab_size, 16).tolist()]
    steps = bench.LLAMA_DECODE_TOKENS

    short = lambda: generate(model, prompt, max_new_tokens=1, stop_tokens=[])  # noqa: E731
    long = lambda: generate(model, prompt, max_new_tokens=steps + 1, stop_tokens=[])  # noqa: E731
    short(), long()
    print("ready", flush=True)
    for _ in sys.stdin:
        print(1 / bench.step_time(short, long, steps, 1, warm_up=False), flush=True)


class OursServer:
    """A `decode_server` child with environment `env` (None: this one's); `rate()` asks it for one
    measurement."""

    def __init__(self, ckpt: str, weight_type: str, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen([sys.executable, __file__, "--decode-server", ckpt, weight_type],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        if self.proc.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError(f"decode server for {weight_type} did not start")

    def rate(self) -> float:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def interleaved_rounds(llama_bench: str, ckpt: str, ggufs: dict[str, str], pairs, rounds: int) -> None:
    servers = {}
    try:
        for ours_type, _ in pairs:
            servers[ours_type] = OursServer(ckpt, ours_type)
        rates = {p: ([], []) for p in pairs}
        for r in range(rounds):
            for ours_type, kind in pairs:
                # who goes first alternates, so a trend in the host's speed favours neither
                if r % 2 == 0:
                    a = servers[ours_type].rate()
                    b = theirs(llama_bench, ggufs[kind], 1)
                else:
                    b = theirs(llama_bench, ggufs[kind], 1)
                    a = servers[ours_type].rate()
                rates[(ours_type, kind)][0].append(a)
                rates[(ours_type, kind)][1].append(b)
                print(f"round {r + 1}: ours {ours_type} {a:.1f} tok/s, llama.cpp {kind} {b:.1f} tok/s, "
                      f"{a / b:.2f}x", flush=True)
    finally:
        for server in servers.values():
            server.close()
    for (ours_type, kind), (a, b) in rates.items():
        ratios = sorted(x / y for x, y in zip(a, b))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        print(f"{ours_type} vs {kind}: medians {statistics.median(a):.1f} / {statistics.median(b):.1f} tok/s; "
              f"per-round ratio median {statistics.median(ratios):.3f}x (quartiles {q[0]:.3f}x, {q[2]:.3f}x), "
              f"ours faster in {sum(x > 1 for x in ratios)} of {len(ratios)} rounds")


def ours_prefill(ckpt: str, weight_type: str = "float32", env: dict[str, str] | None = None) -> float:
    """`prefill_child`'s tok/s, run in a child process with environment `env` (None: this one's)."""
    run = subprocess.run([sys.executable, __file__, "--prefill-child", ckpt, weight_type], capture_output=True,
                         text=True, timeout=1800, check=True, env=env)
    return float(run.stdout.strip().splitlines()[-1])


def prefill_child(ckpt: str, weight_type: str = "float32") -> None:
    """Prints our prefill tok/s of a PREFILL_LENGTHS[-1]-token prompt with `weight_type` weights
    (a key of bench.DECODE_PATHS), as the bench times it, in this process's kernel setting."""
    import numpy as np

    from mixtral_jax import checkpoint
    from mixtral_jax.sampler import generate

    dtype, quantize = bench.DECODE_PATHS[weight_type]
    model = checkpoint.load(ckpt, dtype=dtype, quantize=quantize)
    n = bench.PREFILL_LENGTHS[-1]
    prompt = [np.random.default_rng(0).integers(3, model.config.vocab_size, n).tolist()]
    _, median = bench.timed(lambda: generate(model, prompt, max_new_tokens=1, stop_tokens=[]), 3)
    print(n / median)


def theirs_prefill(llama_bench: str, ggufs: dict[str, str]) -> dict[str, float]:
    return {kind: rate for kind, _, rate in bench.llama_bench_rows(llama_bench, ggufs, bench.PREFILL_LENGTHS[-1], 0, 3)}


def main():
    if sys.argv[1:2] == ["--prefill-child"]:
        return prefill_child(*sys.argv[2:4])
    if sys.argv[1:2] == ["--decode-server"]:
        return decode_server(*sys.argv[2:4])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-bench", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", default="int8:q8_0,float32:f32",
                        help="ours:theirs weight types, comma-separated (ours: float32, bfloat16, int8)")
    parser.add_argument("--prefill", action="store_true", help="prefill 512 tokens instead of decode")
    parser.add_argument("--interleaved", action="store_true",
                        help="short decode rounds against one loaded process of ours per weight type")
    args = parser.parse_args()
    pairs = [tuple(p.split(":")) for p in args.pairs.split(",")]
    if args.rounds < 1 or any(len(p) != 2 or p[0] not in PAIRS or p[1] not in bench.LLAMA_TYPES for p in pairs):
        parser.error(f"--rounds >= 1 and --pairs from {PAIRS} (theirs one of {bench.LLAMA_TYPES})")
    if not (os.path.isfile(args.llama_bench) and os.access(args.llama_bench, os.X_OK)):
        parser.error(f"--llama-bench {args.llama_bench}: not an executable file")
    if args.prefill and args.interleaved:
        parser.error("--interleaved times decode; it does not go with --prefill")
    from mixtral_convert.gguf_export import export_gguf

    def body(_hf, ckpt):
        with tempfile.TemporaryDirectory(prefix="mixtral-jax-gguf-") as tmp:
            ggufs = {}
            for _, kind in pairs:
                ggufs[kind] = os.path.join(tmp, f"{kind}.gguf")
                export_gguf(ckpt, ggufs[kind], gguf_type=kind)
            if args.prefill:
                return prefill_rounds(args.llama_bench, ckpt, ggufs, args.rounds)
            if args.interleaved:
                return interleaved_rounds(args.llama_bench, ckpt, ggufs, pairs, args.rounds)
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


def prefill_rounds(llama_bench: str, ckpt: str, ggufs: dict[str, str], rounds: int) -> None:
    ratios, a, best = [], [], []
    for r in range(rounds):
        ours_rate, theirs_rates = ours_prefill(ckpt), theirs_prefill(llama_bench, ggufs)
        kind = max(theirs_rates, key=theirs_rates.get)
        a.append(ours_rate)
        best.append(theirs_rates[kind])
        ratios.append(ours_rate / theirs_rates[kind])
        print(f"round {r + 1}: ours float32 prefill {ours_rate:.1f} tok/s, llama.cpp "
              + ", ".join(f"{k} {v:.1f}" for k, v in theirs_rates.items())
              + f" tok/s; ours / their best ({kind}) {ratios[-1]:.2f}x", flush=True)
    print(f"prefill {bench.PREFILL_LENGTHS[-1]}: medians {statistics.median(a):.1f} / {statistics.median(best):.1f} "
          f"tok/s (their best type each round) = {statistics.median(a) / statistics.median(best):.2f}x; "
          f"per round {', '.join(f'{x:.2f}x' for x in ratios)}")


if __name__ == "__main__":
    main()
