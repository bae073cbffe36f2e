"""Where a served load's time goes: the `Engine` driven in process (threads, no HTTP) with
serve_load.py's requests, each step timed by kind (with or without a prompt chunk), by how many
slots it decoded and by whether it ran before or after the last request was submitted (the tail,
where fewer requests than slots are left), then the same requests through static `generate`
batches (BENCHMARKS.md, "Serving"), timed whole and with one new token each (their prefill). From
the served steps it prints a bound on the served time for this load: the prompt chunks' steps as
they ran, plus the fewest full decode steps that can produce the tokens those steps did not carry.

`--steps` instead times single engine steps, alternating kinds round by round (medians): decode
steps over every slot at a few context lengths, one slot alone, and prompt chunks of several sizes
with no slot decoding beside them and with all but one slot decoding. A profiling script: it wraps
the engine's private `_deliver` and drives its private `_device` to time steps.

    python benchmarks/serve_profile.py [--concurrency 32] [--prefill-chunk 256] [--no-static]
    python benchmarks/serve_profile.py --steps [--lengths 600,3000] [--chunks 64,128,256] [--rounds 4]
"""

import argparse
import collections
import itertools
import math
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


def report(result: dict, label: str, slots: int = 8) -> dict:
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
    bound(result, slots)
    return rates


def bound(result: dict, slots: int) -> None:
    """Print the least time this load could take with these step costs: every chunk step as it ran
    (the prompts must be read), plus full decode steps (at the median full step's cost) for the
    tokens the chunk steps did not carry. Each request's first token comes from its last chunk."""
    steps, finished = result["steps"], result["finished"]
    chunks = [(n, s) for kind, n, s, _ in steps if kind == "chunk"]
    full = [s for kind, n, s, _ in steps if kind == "decode" and n == slots]
    if not chunks or not full:
        return
    chunk_s = sum(s for _, s in chunks)
    left = sum(len(r.tokens) for r in finished) - len(finished) - sum(n for n, _ in chunks)
    decode_steps = math.ceil(max(0, left) / slots)
    step_s = float(np.median(full))
    floor = chunk_s + decode_steps * step_s
    print(f"  bound: {floor:.1f} s = {len(chunks)} chunk steps ({chunk_s:.1f} s, carrying "
          f"{sum(n for n, _ in chunks)} decode tokens) + {decode_steps} full decode steps x {step_s * 1e3:.0f} ms "
          f"for the other {left} tokens; served / bound {result['wall_s'] / floor:.2f}x")


def step_costs(model, *, slots: int = 8, lengths=(600, 3000), chunks=(64, 128, 256), rounds: int = 4) -> dict:
    """Single engine steps by kind, alternating round by round (the first round is a warm-up and
    not counted). Returns {label: [seconds per round]}.

    Kinds: "decode N at L" (a step without a chunk, all N slots decoding, each with L tokens in its
    cache), "decode 1 at L" (one slot's program), "chunk C" (a prompt chunk of C tokens, no slot
    decoding), "chunk C + R at L" (the same chunk beside R = slots - 1 decoding slots)."""
    import jax
    import jax.numpy as jnp

    from mixtral_jax.serving.engine import Engine, Options

    engine = Engine(model, slots=slots, prefill_chunk=max(chunks), stop_tokens=[])
    engine._slots = engine._empty_slots()
    engine._warm_up()
    rng = np.random.default_rng(0)
    options = Options(max_new_tokens=10**6)

    def decoding(n: int, length: int) -> None:
        """Slots [0, n) decode from `length` cached positions (their cache rows hold whatever the
        warm-up left; the cost does not depend on the values)."""
        s = engine._slots
        active = np.arange(slots) < n
        cache = dict(s.cache, lengths=jnp.asarray(np.where(active, length, 0), jnp.int32))
        engine._slots = s.replace(cache=cache, active=jnp.asarray(active), n_new=jnp.zeros((slots,), jnp.int32),
                                  max_new=jnp.full((slots,), 10**6, jnp.int32),
                                  last=jnp.asarray(rng.integers(3, model.config.vocab_size, slots), jnp.int32))

    def chunk(size: int) -> dict:
        tokens = rng.integers(3, model.config.vocab_size, size).astype(np.int32)
        return dict(slot=slots - 1, tokens=tokens, n_valid=size, start=0, options=options, final=False)

    cases = {}
    for length in lengths:
        cases[f"decode {slots} at {length}"] = (slots, length, dict(op="decode"))
        cases[f"decode 1 at {length}"] = (1, length, dict(op="decode", rows=np.zeros(1, np.int32)))
    for size in chunks:
        cases[f"chunk {size}"] = (0, lengths[0], dict(op="prefill", size=size))
        cases[f"chunk {size} + {slots - 1} at {lengths[0]}"] = (slots - 1, lengths[0], dict(op="prefill", size=size))
    times = {label: [] for label in cases}
    for r in range(rounds + 1):
        for label, (n, length, call) in cases.items():
            decoding(n, length)
            jax.block_until_ready(engine._slots.active)
            kw = dict(pieces=[chunk(call["size"])]) if call["op"] == "prefill" else dict(rows=call.get("rows"))
            start = time.perf_counter()
            jax.block_until_ready(engine._device(call["op"], **kw))
            if r:
                times[label].append(time.perf_counter() - start)
        if r:
            print(f"  round {r} of {rounds} done", file=sys.stderr, flush=True)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prefill-chunk", type=int, default=256)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--no-static", action="store_true")
    parser.add_argument("--steps", action="store_true", help="time single engine steps instead of a load")
    parser.add_argument("--lengths", default="600,3000", help="--steps: cached tokens per decoding slot")
    parser.add_argument("--chunks", default="64,128,256", help="--steps: prompt chunk sizes")
    parser.add_argument("--rounds", type=int, default=4, help="--steps: alternating rounds")
    args = parser.parse_args()
    try:
        lengths = [int(v) for v in args.lengths.split(",")]
        chunks = [int(v) for v in args.chunks.split(",")]
    except ValueError:
        parser.error("--lengths and --chunks take comma-separated integers")
    if args.rounds < 1 or min(lengths) < 1 or any(c < 16 or c & (c - 1) for c in chunks):
        parser.error("--rounds and --lengths must be >= 1, --chunks powers of two >= 16")

    import mixtral_jax as mj
    from mixtral_jax.checkpoint import save

    config = mj.MixtralConfig.preset("small")
    with tempfile.TemporaryDirectory() as tmp:
        save(f"{tmp}/small", config, mj.init_params(config, seed=0), tokenizer=mj.Tokenizer().path)
        model = mj.load(f"{tmp}/small")
    if args.steps:
        times = step_costs(model, lengths=lengths, chunks=chunks, rounds=args.rounds)
        print(f"engine steps, small config, 8 slots (median of {args.rounds} alternating rounds; each round's ms):")
        for label, ts in times.items():
            print(f"  {label:>24}: {np.median(ts) * 1e3:7.1f} ms  ({' '.join(f'{t * 1e3:.0f}' for t in ts)})")
        return
    requests = draw_requests(args.requests, 0, config.vocab_size, (16, 512), (16, 128))
    result = profile(model, requests, concurrency=args.concurrency, prefill_chunk=args.prefill_chunk)
    report(result, f"concurrency {args.concurrency}, --prefill-chunk {args.prefill_chunk}")
    if not args.no_static:
        static = static_batches(model, requests, 8)
        prefill = static_batches(model, [dict(r, max_tokens=1) for r in requests], 8)
        print(f"static batches of 8: {static['wall_s']:.1f} s ({prefill['wall_s']:.1f} s with one new token each); "
              f"served / static {static['wall_s'] / result['wall_s']:.2f}x")


if __name__ == "__main__":
    main()
