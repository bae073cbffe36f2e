"""Where a served load's time goes: the `Engine` driven in process (threads, no HTTP) with
serve_load.py's requests, each step timed by kind (with or without a prompt chunk), by how many
slots it decoded and by whether it ran before or after the last request was submitted (the tail,
where fewer requests than slots are left), then the same requests through static `generate`
batches (BENCHMARKS.md, "Serving"). A profiling script: it wraps the engine's private `_deliver`
to time each step.

    python benchmarks/serve_profile.py [--concurrency 32] [--prefill-chunk 256] [--no-static]
"""

import argparse
import collections
import itertools
import os
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from serve_load import draw_requests, static_batches  # noqa: E402


def profile(model, requests: list, *, slots: int = 8, concurrency: int = 32, prefill_chunk: int = 256,
            max_seq_len: int | None = None) -> dict:
    """The requests through an in-process `Engine` at `concurrency` (threads), each step timed.

    Returns:
      {"wall_s", "finished" (the Requests), "idle_ttft_s" (median of up to five short prompts sent
      alone first), "steps": [(kind, slots decoding, seconds, in the tail)]}.
    """
    from mixtral_jax.serving.engine import Engine, Options

    engine = Engine(model, slots=slots, prefill_chunk=prefill_chunk, max_seq_len=max_seq_len, stop_tokens=[],
                    max_queue=max(64, len(requests)))
    engine.start()
    steps, last, last_submit = [], [None], [float("inf")]
    deliver = engine._deliver

    def timed_deliver(step):
        deliver(step)
        now = time.perf_counter()
        decoding, _, first, _ = step
        if last[0] is not None:
            steps.append(("chunk" if first is not None else "decode", len(decoding), now - last[0],
                          last[0] >= last_submit[0]))
        last[0] = now

    engine._deliver = timed_deliver
    idle = [engine.generate(r["prompt"], Options(max_new_tokens=2), timeout=300)
            for r in requests if len(r["prompt"]) <= 64][:5]
    idle_ttft = float(np.median([r.first_token_at - r.submitted for r in idle]))
    steps.clear()
    last[0] = None

    gate, finished, submitted = threading.Semaphore(concurrency), [], itertools.count(1)

    def one(r):
        with gate:
            if next(submitted) == len(requests):
                last_submit[0] = time.perf_counter()
            finished.append(engine.generate(r["prompt"], Options(max_new_tokens=r["max_tokens"]), timeout=900))

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(r,)) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=1800)
    wall = time.perf_counter() - start
    engine.shutdown()
    return {"wall_s": wall, "finished": finished, "idle_ttft_s": idle_ttft, "steps": steps}


def report(result: dict, label: str) -> dict:
    """Print a `profile` result: throughput, short-prompt TTFT against idle, and the steps by kind.
    Returns {"req_s", "tok_s"}."""
    finished, wall = result["finished"], result["wall_s"]
    rates = {"req_s": len(finished) / wall, "tok_s": sum(len(r.tokens) for r in finished) / wall}
    short = [r.first_token_at - r.submitted for r in finished if len(r.prompt) <= 64]
    p99 = f"{np.percentile(short, 99) * 1e3:.0f} ms" if short else "-"
    print(f"served, {label}: {len(finished)} requests in {wall:.1f} s ({rates['req_s']:.3f} req/s, "
          f"{rates['tok_s']:.1f} tok/s); short-prompt TTFT p99 {p99} vs {result['idle_ttft_s'] * 1e3:.0f} ms idle")
    by_kind = collections.defaultdict(lambda: [0, 0.0])
    for kind, n_decoding, seconds, tail in result["steps"]:
        by_kind[(tail, kind, n_decoding)][0] += 1
        by_kind[(tail, kind, n_decoding)][1] += seconds
    for (tail, kind, n_decoding), (count, seconds) in sorted(by_kind.items()):
        print(f"  {'tail' if tail else 'load'}: {kind:>6} steps with {n_decoding} slots decoding: {count:4d}, "
              f"{seconds:5.1f} s, {seconds / count * 1e3:6.1f} ms each")
    return rates


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prefill-chunk", type=int, default=256)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--no-static", action="store_true")
    args = parser.parse_args()

    import mixtral_jax as mj
    from mixtral_jax.checkpoint import save

    config = mj.MixtralConfig.preset("small")
    with tempfile.TemporaryDirectory() as tmp:
        save(f"{tmp}/small", config, mj.init_params(config, seed=0), tokenizer=mj.Tokenizer().path)
        model = mj.load(f"{tmp}/small")
    requests = draw_requests(args.requests, 0, config.vocab_size, (16, 512), (16, 128))
    result = profile(model, requests, concurrency=args.concurrency, prefill_chunk=args.prefill_chunk)
    report(result, f"concurrency {args.concurrency}, --prefill-chunk {args.prefill_chunk}")
    if not args.no_static:
        static = static_batches(model, requests, 8)
        print(f"static batches of 8: {static['wall_s']:.1f} s; "
              f"served / static {static['wall_s'] / result['wall_s']:.2f}x")


if __name__ == "__main__":
    main()
