"""Decode and serving against the memory roofline on an accelerator (issues 14 and 16's device check).

A random Mixtral-8x7B-shaped model truncated to a few layers (full width), built in memory in the
stacked layout that GPUs and TPUs use:

- `decode`: `generate`'s decode step at batch 1 and 8 with bfloat16 weights and with int8
  weight-only ones (`quantize_params`), timed as `mixtral-jax bench` times it (a long and a short
  generation back to back; the difference over the extra steps), against the time the bytes the step
  reads take at the memory's speed: the HBM sum probe below and the device's nominal figure.
- `engine`: the serving `Engine` with `--slots` slots under serve_load.py's requests (prompts 16-512
  tokens, outputs 16-128, all sent at once), driven in process as serve_profile.py drives it: request
  and token throughput, and each full decode step against the bytes it reads.

Bytes a step reads: every attention matrix, the router and lm_head, and of the experts those that
b tokens pick if routing were uniform (E (1 - (1 - k/E)^b) of E), plus the KV cache rows it attends
to. The prints go to stdout and, with --out, a JSON file; each part prints as it ends, so a run cut
short keeps what it finished.

    python benchmarks/gpu_roofline.py [--layers 4] [--slots 32] [--parts decode,engine] [--out FILE]

On the H200 (`device` tool): `PYTHONUNBUFFERED=1 python3 benchmarks/gpu_roofline.py --out
$OUT/gpu_roofline.json` (no wheels to carry: the engine needs none of the server's packages).
On CPU with `--preset tiny --layers 2 --slots 4 --requests 8 --steps 8` it checks the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from serve_load import draw_requests  # noqa: E402
from serve_profile import profile, report  # noqa: E402

NOMINAL_TB_S = {"H200": 4.8, "H100": 3.35, "A100": 2.0}  # HBM read, TB/s, by device-kind substring


def leaf_bytes(tree) -> int:
    import jax

    return sum(a.nbytes for a in jax.tree.leaves(tree))


def step_bytes(config, params, rows: int, context: int) -> float:
    """Bytes one decode step of `rows` tokens reads (module docstring), at `context` cached positions."""
    experts = ("w_gate", "w_up", "w_down")
    layers = [params[f"layers_{i}"] for i in range(config.n_layers)]
    dense = sum(leaf_bytes({k: v for k, v in p.items() if k not in experts}) for p in layers)
    expert = sum(leaf_bytes([p[k] for k in experts]) for p in layers) / config.n_experts
    touched = config.n_experts * (1 - (1 - config.top_k / config.n_experts) ** rows)
    kv_itemsize = params["embed"].dtype.itemsize  # the cache takes the embedding's dtype (sampler.py)
    kv = 2 * config.n_layers * rows * context * config.n_kv_heads * config.head_dim * kv_itemsize
    return dense + touched * expert + leaf_bytes(params["lm_head"]) + kv


def hbm_probe(gib: float = 2.0, runs: int = 10) -> float:
    """Read bandwidth (bytes/s) of a jitted sum over `gib` GiB of bfloat16 (median of `runs`)."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (int(gib * 2 ** 30) // 2,), jnp.bfloat16)
    nbytes = x.nbytes
    total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    total(x).block_until_ready()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        total(x).block_until_ready()
        times.append(time.perf_counter() - start)
    del x
    return nbytes / float(np.median(times))


def nominal(device_kind: str) -> float | None:
    return next((tb * 1e12 for name, tb in NOMINAL_TB_S.items() if name in device_kind), None)


def roofline(seconds: float, nbytes: float, probe: float, nominal_bw: float | None) -> dict:
    out = {"ms": seconds * 1e3, "bytes": nbytes, "probe_ms": nbytes / probe * 1e3,
           "of_probe": nbytes / probe / seconds}
    if nominal_bw:
        out.update(nominal_ms=nbytes / nominal_bw * 1e3, of_nominal=nbytes / nominal_bw / seconds)
    return out


def line(label: str, r: dict) -> str:
    nom = f", nominal {r['nominal_ms']:.2f} ms ({r['of_nominal']:.0%})" if "nominal_ms" in r else ""
    return (f"{label}: {r['ms']:.2f} ms a step, {r['bytes'] / 1e9:.3g} GB read: roofline at the probe "
            f"{r['probe_ms']:.2f} ms ({r['of_probe']:.0%} of it){nom}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mixtral-8x7b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--parts", default="decode,engine")
    parser.add_argument("--steps", type=int, default=128, help="extra decode steps timed (decode part)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prefill-chunk", type=int, default=256)
    parser.add_argument("--out", help="also write the results here as JSON")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= {"decode", "engine"}:
        parser.error(f"--parts: decode and/or engine, got {args.parts!r}")

    import jax
    import jax.numpy as jnp

    import mixtral_jax as mj
    from mixtral_jax.bench import step_time
    from mixtral_jax.quant import quantize_params

    t0 = time.perf_counter()
    device = jax.devices()[0]
    config = mj.MixtralConfig.preset(args.preset).replace(n_layers=args.layers, max_seq_len=1024)
    results: dict = {"device": device.device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
                     "config": {"preset": args.preset, "layers": args.layers}}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)

    probe = hbm_probe(gib=2.0 if results["backend"] != "cpu" else 0.25)
    nominal_bw = nominal(device.device_kind)
    results["probe_gb_s"] = probe / 1e9
    print(f"{device.device_kind} ({results['backend']}, jax {jax.__version__}): sum probe {probe / 1e9:.0f} GB/s"
          f"{f', nominal {nominal_bw / 1e9:.0f}' if nominal_bw else ''} [{time.perf_counter() - t0:.0f} s]")
    params = mj.init_params(config, seed=0, dtype=jnp.bfloat16)
    rng = np.random.default_rng(0)

    if "decode" in parts:
        results["decode"] = {}
        for name in ("bfloat16", "int8"):
            model = mj.Model(config, params if name == "bfloat16" else quantize_params(params))
            for b in (1, 8):
                prompts = [rng.integers(3, config.vocab_size, 16).tolist() for _ in range(b)]
                sec = step_time(lambda: mj.generate(model, prompts, max_new_tokens=1, stop_tokens=[]),
                                lambda: mj.generate(model, prompts, max_new_tokens=args.steps + 1, stop_tokens=[]),
                                args.steps, args.runs)
                r = roofline(sec, step_bytes(config, model.params, b, 16 + args.steps // 2), probe, nominal_bw)
                r["tok_s"] = b / sec
                results["decode"][f"{name}/{b}"] = r
                print(line(f"decode {name}, batch {b} ({r['tok_s']:.0f} tok/s)", r)
                      + f" [{time.perf_counter() - t0:.0f} s]")
                save()
            del model

    if "engine" in parts:
        model = mj.Model(config, params)
        requests = draw_requests(args.requests, 0, config.vocab_size, (16, 512), (16, 128))
        res = profile(model, requests, slots=args.slots, concurrency=args.requests, prefill_chunk=args.prefill_chunk,
                      max_seq_len=config.max_seq_len)
        label = f"{args.slots} slots, {args.requests} requests at once, --prefill-chunk {args.prefill_chunk}"
        rates = report(res, label)
        full = [s for kind, n, s, _ in res["steps"] if kind == "decode" and n == args.slots]
        results["engine"] = {"wall_s": res["wall_s"], "requests": len(res["finished"]), **rates,
                             "idle_ttft_ms": res["idle_ttft_s"] * 1e3, "full_decode_steps": len(full)}
        if full:
            context = int(np.mean([len(r["prompt"]) + r["max_tokens"] / 2 for r in requests]))
            r = roofline(float(np.median(full)), step_bytes(config, params, args.slots, context), probe, nominal_bw)
            results["engine"]["full_step"] = r
            print(line(f"engine decode step, all {args.slots} slots (median of {len(full)})", r))
        print(f"[{time.perf_counter() - t0:.0f} s]")
        save()


if __name__ == "__main__":
    main()
