"""Choosing generate's default prefill chunk: time and peak memory of an 8k-token prompt.

For each chunk size (and one-shot prefill), a fresh child process loads a random `small` model
(float32), runs `generate(..., max_new_tokens=1)` once to compile, then times --runs more; it
reports the median seconds, prompt tokens/s and the process's peak RSS. Side by side in one run;
compare the ratios. Usage:
    python benchmarks/prefill_chunk.py [--prompt-len 8192] [--chunks 256,512,1024,2048,0] [--runs 2] [--json]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def child(prompt_len: int, chunk: int, runs: int) -> None:
    import numpy as np

    import mixtral_jax as mj

    config = mj.MixtralConfig.preset("small").replace(max_seq_len=max(prompt_len + 8, 2048))
    model = mj.Model(config, mj.init_params(config, seed=0))
    prompt = np.random.default_rng(0).integers(3, config.vocab_size, prompt_len).tolist()
    mj.generate(model, [prompt], max_new_tokens=1, stop_tokens=[], prefill_chunk=chunk or None)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        mj.generate(model, [prompt], max_new_tokens=1, stop_tokens=[], prefill_chunk=chunk or None)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    print(json.dumps({"chunk": chunk, "seconds": seconds, "tok_s": prompt_len / seconds,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-len", type=int, default=8192)
    ap.add_argument("--chunks", default="256,512,1024,2048,0", help="0: the whole prompt at once")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.prompt_len, args.child, args.runs)
        return
    rows = []
    for chunk in (int(c) for c in args.chunks.split(",")):
        out = subprocess.run([sys.executable, __file__, "--child", str(chunk), "--prompt-len", str(args.prompt_len),
                              "--runs", str(args.runs)], capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    best = max(r["tok_s"] for r in rows)
    for r in rows:
        r["speed_vs_best"] = r["tok_s"] / best
    if args.json:
        print(json.dumps({"prompt_len": args.prompt_len, "rows": rows}))
        return
    print(f"small config, float32, {args.prompt_len}-token prompt, generate(max_new_tokens=1)")
    print(f"{'chunk':>8}{'seconds':>10}{'tok/s':>10}{'vs best':>9}{'peak RSS':>11}")
    for r in rows:
        print(f"{r['chunk'] or 'none':>8}{r['seconds']:>10.2f}{r['tok_s']:>10.0f}{r['speed_vs_best']:>8.2f}x"
              f"{r['peak_rss'] / 1e9:>9.2f}GB")


if __name__ == "__main__":
    main()
