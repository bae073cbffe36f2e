"""`mixtral-jax bench`: this project against HF transformers on the same weights, side by side.

Everything is float32, greedy, 2 threads, medians of `runs` timed runs after a warm-up (compile
excluded and reported separately). In the same run: the machine's read bandwidth (best-of-5 sum
of a 1 GiB float32 array) and float32 matmul peak (best-of-5 2048^3 matmul under jit), so every
speed is also a fraction of what the hardware allows. Peak RSS of this project is measured in a
child process of its own that loads the checkpoint and generates.

Definitions:
- prefill tok/s: prompt tokens / time to prefill and choose one token (HF: a forward with
  `logits_to_keep=1`, as `generate` computes it);
- decode tok/s: (time for N+1 new tokens - time for 1) / N, times the batch;
- active bytes per decode step: every non-expert weight plus, per layer, the distinct experts the
  batch selects (top_k of E at batch 1; all E assumed at batch 8) - the bytes a perfect
  implementation must read;
- useful prefill FLOPs: 2 x (non-expert matmul parameters + top_k experts) per token, plus causal
  attention, plus the last position's lm_head.

`--long` (`run_long`) instead times long prompts: prefill of 4k and 16k tokens, one warm-up and one
timed run each, every measurement in a child process of its own that reports its peak RSS; this
project (default attention and prefill chunk) beside HF with `attn_implementation="sdpa"`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import kernels
from .config import MixtralConfig
from .model import Model, init_params

PREFILL_LENGTHS = (16, 100, 512)
LONG_LENGTHS = (4096, 16384)
DECODE_BATCHES = (1, 8)
DECODE_TOKENS = 32
SWEEP = tuple(range(1, 513, 17)) + (512,)
LLAMA_VOCAB = 32000
LLAMA_TYPES = ("f32", "f16", "q8_0")
LLAMA_DECODE_TOKENS = 128


def step_time(short: Callable[[], Any], long: Callable[[], Any], steps: int, runs: int,
              warm_up: bool = True) -> float:
    """Seconds per decode step: the median over `runs` of (long - short) / steps, each pair timed
    back to back (after one warm-up call of each, unless the caller has made them) so machine
    noise affects both alike."""
    if warm_up:
        short(), long()
    diffs = []
    for _ in range(runs):
        start = time.perf_counter()
        short()
        mid = time.perf_counter()
        long()
        diffs.append((time.perf_counter() - mid) - (mid - start))
    return max(statistics.median(diffs), 1e-9) / steps


def timed(fn: Callable[[], Any], runs: int) -> tuple[float, float]:
    """(first call seconds, median of `runs` later calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def machine_probes() -> dict[str, float]:
    """Read bandwidth (bytes/s) and float32 matmul peak (FLOP/s), best of 5, under jit."""
    a = jnp.ones((2**28,), jnp.float32)  # 1 GiB
    total = jax.jit(jnp.sum)
    total(a).block_until_ready()
    best = min(_time(lambda: total(a).block_until_ready()) for _ in range(5))
    bandwidth = a.nbytes / best
    probes = {"read_bandwidth_sum": bandwidth}
    if kernels.enabled():
        read = jax.jit(kernels.read_probe)
        read(a).block_until_ready()
        probes["read_bandwidth_threads"] = a.nbytes / min(_time(lambda: read(a).block_until_ready()) for _ in range(5))
    a = None  # the 1 GiB buffer goes before the matmul probe
    x = jnp.ones((2048, 2048), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(x, x).block_until_ready()
    best = min(_time(lambda: mm(x, x).block_until_ready()) for _ in range(5))
    return {**probes, "read_bandwidth": max(probes.values()), "matmul_peak": 2 * 2048**3 / best}


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weight_bytes(config: MixtralConfig, itemsize: int = 4) -> dict[str, int]:
    """Non-expert and per-expert-per-layer parameter bytes."""
    c = config
    attention = c.n_layers * (2 * c.d_model * c.n_heads * c.head_dim + 2 * c.d_model * c.n_kv_heads * c.head_dim)
    small = c.n_layers * (2 * c.d_model + c.d_model * c.n_experts) + c.d_model
    return {"attention": attention * itemsize, "lm_head": c.vocab_size * c.d_model * itemsize,
            "embed": c.vocab_size * c.d_model * itemsize, "small": small * itemsize,
            "expert": 3 * c.d_model * c.d_ff * itemsize}


def active_step_bytes(config: MixtralConfig, batch: int) -> int:
    """Bytes a decode step must read (embedding rows are negligible and not counted)."""
    w = weight_bytes(config)
    experts = config.top_k if batch == 1 else config.n_experts
    return w["attention"] + w["lm_head"] + w["small"] + config.n_layers * experts * w["expert"]


def prefill_flops(config: MixtralConfig, tokens: int) -> float:
    """Useful FLOPs of a prefill of `tokens` positions with last-position logits only."""
    c = config
    w = weight_bytes(config, itemsize=1)
    per_token = 2 * (w["attention"] + c.n_layers * c.top_k * w["expert"] + c.n_layers * c.d_model * c.n_experts)
    attention = c.n_layers * 2 * 2 * c.n_heads * c.head_dim * tokens * (tokens + 1) / 2
    return per_token * tokens + attention + 2 * w["lm_head"]


def bench_jax(model: Model, runs: int) -> dict[str, Any]:
    from .sampler import compiled_programs, generate

    rng = np.random.default_rng(0)
    v = model.config.vocab_size
    out: dict[str, Any] = {"prefill": {}, "decode": {}}
    # First, from a cold cache: how many programs a sweep of prompt lengths compiles, and how long.
    before, start = compiled_programs(), time.perf_counter()
    for n in SWEEP:
        generate(model, [[5] * n], max_new_tokens=2, stop_tokens=[])
    out["compile_sweep"] = {"prompt_lengths": "1..512 step 17, and 512", "programs": compiled_programs() - before,
                            "seconds": time.perf_counter() - start}
    for n in PREFILL_LENGTHS:
        prompt = [rng.integers(3, v, n).tolist()]
        first, median = timed(lambda: generate(model, prompt, max_new_tokens=1, stop_tokens=[]), runs)
        out["prefill"][n] = {"tok_s": n / median, "seconds": median, "first_call_s": first}
    out["decode"] = {b: {"tok_s": b / step, "step_s": step} for b, step in decode_steps(model, runs, rng).items()}
    return out


def decode_steps(model: Model, runs: int, rng) -> dict[int, float]:
    """Seconds per `generate` decode step at each of DECODE_BATCHES (random 16-token prompts)."""
    from .sampler import generate

    out = {}
    for b in DECODE_BATCHES:
        prompts = [rng.integers(3, model.config.vocab_size, 16).tolist() for _ in range(b)]
        out[b] = step_time(lambda: generate(model, prompts, max_new_tokens=1, stop_tokens=[]),
                           lambda: generate(model, prompts, max_new_tokens=DECODE_TOKENS + 1, stop_tokens=[]),
                           DECODE_TOKENS, runs)
    return out


# Weight type -> how `checkpoint.load` makes it (dtype, quantize).
DECODE_PATHS = {"float32": ("float32", None), "bfloat16": ("bfloat16", None), "int8": ("float32", "int8")}


def decode_child(ckpt: str, dtype: str, quantize: str | None, runs: int) -> None:
    """Prints {batch: tok/s} of `generate`'s decode for one weight type, in this process's kernel
    setting (a child process: the kernel choice is made when a program is traced)."""
    from . import checkpoint

    model = checkpoint.load(ckpt, dtype=dtype, quantize=quantize)
    steps = decode_steps(model, runs, np.random.default_rng(0))
    print(json.dumps({b: b / step for b, step in steps.items()}))


def bench_decode_paths(ckpt: str, runs: int, weight_types=tuple(DECODE_PATHS)) -> dict[str, Any]:
    """Decode tok/s of each weight type (keys of DECODE_PATHS) with the CPU kernels on and off, each
    in its own process: {"float32/on": {batch: tok/s}, ...}."""
    out: dict[str, Any] = {}
    settings = ("on", "off") if kernels.enabled() else ("off",)
    for dtype, quantize in (DECODE_PATHS[w] for w in weight_types):
        for setting in settings:
            env = dict(os.environ, **{kernels.ENV: "1" if setting == "on" else "0"})
            cmd = [sys.executable, "-m", "mixtral_jax.bench", "--decode-child", ckpt, dtype, quantize or "none",
                   str(runs)]
            run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
            if run.returncode != 0:
                raise RuntimeError(f"decode benchmark child failed: {run.stderr.strip()[-500:]}")
            name = f"{quantize or dtype}/{setting}"
            out[name] = {int(b): v for b, v in json.loads(run.stdout.strip().splitlines()[-1]).items()}
    return out


def bench_hf(hf_folder: str, config: MixtralConfig, runs: int) -> dict[str, Any]:
    import torch
    import transformers

    torch.set_num_threads(2)
    model = transformers.MixtralForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"prefill": {}, "decode": {}}
    with torch.inference_mode():
        for n in PREFILL_LENGTHS:
            ids = torch.tensor(rng.integers(3, config.vocab_size, (1, n)))
            _, median = timed(lambda: model(ids, logits_to_keep=1), runs)
            out["prefill"][n] = {"tok_s": n / median, "seconds": median}
        for b in DECODE_BATCHES:
            ids = torch.tensor(rng.integers(3, config.vocab_size, (b, 16)))

            def gen(k):
                return model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                      pad_token_id=0, eos_token_id=None)
            step = step_time(lambda: gen(1), lambda: gen(DECODE_TOKENS + 1), DECODE_TOKENS, runs)
            out["decode"][b] = {"tok_s": b / step, "step_s": step}
    return out


def rss_child(ckpt: str) -> None:
    """Child mode: load the checkpoint, generate, print our own peak RSS in bytes.

    The peak is /proc's VmHWM, which starts afresh at exec; `ru_maxrss` would not do: Linux
    carries it over from the forked parent, so the child would count the parent's memory."""
    from . import checkpoint
    from .sampler import generate

    model = checkpoint.load(ckpt, dtype="float32")
    generate(model, [[1] * 100], max_new_tokens=16, stop_tokens=[])
    generate(model, [[1] * 16] * 8, max_new_tokens=16, stop_tokens=[])
    with open("/proc/self/status", encoding="ascii") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(kib * 1024)


def measure_rss(ckpt: str) -> int:
    """Peak RSS (bytes) of a fresh process that loads `ckpt` and generates (Linux)."""
    proc = subprocess.run([sys.executable, "-m", "mixtral_jax.bench", "--rss-child", ckpt],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"RSS child failed (status {proc.returncode}): {proc.stderr[-500:]}")
    return int(proc.stdout.strip().splitlines()[-1])


def long_child(side: str, folder: str, n: int) -> None:
    """Child mode: prefill an n-token prompt (a warm-up, then one timed run); print
    {"seconds", "peak_rss"} as JSON. side "jax": a project checkpoint; "hf": an HF folder, sdpa."""
    import json

    rng = np.random.default_rng(0)
    if side == "jax":
        from . import checkpoint
        from .sampler import generate

        model = checkpoint.load(folder, dtype="float32")
        ids = [rng.integers(3, model.config.vocab_size, n).tolist()]

        def once():
            generate(model, ids, max_new_tokens=1, stop_tokens=[])
    else:
        import torch
        import transformers

        torch.set_num_threads(2)
        model = transformers.MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                attn_implementation="sdpa").eval()
        ids = torch.tensor(rng.integers(3, model.config.vocab_size, (1, n)))

        def once():
            with torch.inference_mode():
                model(ids, logits_to_keep=1)
    once()
    seconds = _time(once)
    with open("/proc/self/status", encoding="ascii") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"seconds": seconds, "peak_rss": kib * 1024}))


def _long_measure(side: str, folder: str, n: int) -> dict[str, Any]:
    import json

    proc = subprocess.run([sys.executable, "-m", "mixtral_jax.bench", "--long-child", side, folder, str(n)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"long-prompt child failed (status {proc.returncode}): {proc.stderr[-500:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"tok_s": n / r["seconds"], "seconds": r["seconds"], "peak_rss": r["peak_rss"]}


def _require_hf() -> None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise ValueError("bench compares with HF transformers: pip install -e '.[dev]' "
                         "(torch==2.13.0, transformers), or pass --no-hf") from None


def _with_checkpoints(config: MixtralConfig, seed: int, body: Callable[[str, str], None]) -> None:
    """Random float32 weights written as an HF folder and converted; body(hf folder, checkpoint).
    With Mixtral's vocabulary size the real tokenizer goes in too (a GGUF export needs one)."""
    from mixtral_convert import convert, write_folder

    from .checkpoint import param_items
    from .tokenizer import Tokenizer

    params = init_params(config, seed=seed)
    tokenizer = Tokenizer().path if config.vocab_size == LLAMA_VOCAB else None
    with tempfile.TemporaryDirectory(prefix="mixtral-jax-bench-") as tmp:
        hf_folder, ckpt = os.path.join(tmp, "hf"), os.path.join(tmp, "ckpt")
        write_folder(hf_folder, config, param_items(config, params), "hf", np.float32, tokenizer=tokenizer)
        del params
        convert(hf_folder, ckpt)
        body(hf_folder, ckpt)


def llama_bench_rows(llama_bench: str, paths: dict[str, str], n_prompt: int, n_gen: int,
                     runs: int) -> list[tuple[str, int, float]]:
    """Run llama.cpp's `llama-bench` on the GGUF files `paths` ({name: path}) with as many threads as
    we have cores: prefill of `n_prompt` tokens and decode of `n_gen` (0: skip either). Returns
    [(name, n_prompt of the row (0 for decode), tok/s)]."""
    cmd = [llama_bench, *[a for p in paths.values() for a in ("-m", p)], "-p", str(n_prompt), "-n", str(n_gen),
           "-t", str(os.cpu_count()), "-r", str(runs), "-o", "json"]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    except OSError as e:
        raise ValueError(f"--llama-bench {llama_bench}: cannot run it ({e})") from None
    if run.returncode != 0:
        raise ValueError(f"llama-bench failed ({run.returncode}): {run.stderr.strip()[-500:]}")
    by_path = {p: k for k, p in paths.items()}
    return [(by_path[row["model_filename"]], int(row["n_prompt"]), float(row["avg_ts"])) for row in json.loads(run.stdout)]


def bench_llama_cpp(llama_bench: str, ckpt: str, runs: int) -> dict[str, Any]:
    """llama.cpp's `llama-bench` on GGUF exports (f32, f16, q8_0) of the same weights, with as many
    threads as we have cores: {type: {"prefill_tok_s" (PREFILL_LENGTHS[-1] tokens), "decode_tok_s"}}."""
    from mixtral_convert.gguf_export import export_gguf

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mixtral-jax-gguf-") as tmp:
        paths = {}
        for kind in LLAMA_TYPES:
            paths[kind] = os.path.join(tmp, f"{kind}.gguf")
            export_gguf(ckpt, paths[kind], gguf_type=kind)
        for kind, n_prompt, rate in llama_bench_rows(llama_bench, paths, PREFILL_LENGTHS[-1], LLAMA_DECODE_TOKENS,
                                                     runs):
            out.setdefault(kind, {})["prefill_tok_s" if n_prompt else "decode_tok_s"] = rate
    return out


def run_long(config_name: str = "small", with_hf: bool = True, seed: int = 0,
             lengths: tuple[int, ...] = LONG_LENGTHS) -> dict[str, Any]:
    """Long-prompt prefill, this project beside HF (sdpa); the report's "long" key holds
    {"jax": {n: {tok_s, seconds, peak_rss}}, "hf": {...}, "speedup_vs_hf": {n: x}}."""
    if with_hf:
        _require_hf()
    config = MixtralConfig.preset(config_name)
    if max(lengths) >= config.max_seq_len:
        raise ValueError(f"prompts of {max(lengths)} tokens do not fit the {config_name} config's context "
                         f"({config.max_seq_len})")
    report: dict[str, Any] = {"config": config_name, "machine": _machine(), "probes": machine_probes()}
    long: dict[str, Any] = {"lengths": list(lengths), "jax": {}}

    def body(hf_folder, ckpt):
        for n in lengths:
            long["jax"][n] = _long_measure("jax", ckpt, n)
            if with_hf:
                long.setdefault("hf", {})[n] = _long_measure("hf", hf_folder, n)
    _with_checkpoints(config, seed, body)
    if with_hf:
        long["speedup_vs_hf"] = {n: long["jax"][n]["tok_s"] / long["hf"][n]["tok_s"] for n in lengths}
    report["long"] = long
    return report


def format_long(report: dict[str, Any]) -> str:
    long, p = report["long"], report["probes"]
    lines = [f"config {report['config']}, float32, long prompts (one warm-up, one timed run each)",
             f"machine: read bandwidth {p['read_bandwidth'] / 1e9:.1f} GB/s, "
             f"float32 matmul peak {p['matmul_peak'] / 1e9:.1f} GFLOP/s", "",
             f"{'prefill':>10}{'mixtral_jax tok/s':>19}{'peak RSS':>11}{'HF sdpa tok/s':>15}{'peak RSS':>11}{'speedup':>9}"]
    for n in long["lengths"]:
        ours, hf = long["jax"][n], long.get("hf", {}).get(n, {})
        lines.append(f"{n:>10}{ours['tok_s']:>19.1f}{ours['peak_rss'] / 1e9:>9.2f}GB"
                     f"{hf.get('tok_s', float('nan')):>15.1f}{hf.get('peak_rss', float('nan')) / 1e9:>9.2f}GB"
                     f"{long.get('speedup_vs_hf', {}).get(n, float('nan')):>8.2f}x")
    return "\n".join(lines)


def run(config_name: str = "small", runs: int = 5, with_hf: bool = True, seed: int = 0,
        llama_bench: str | None = None, weight_types=tuple(DECODE_PATHS)) -> dict[str, Any]:
    """The whole benchmark; returns the report as a dict (see `format_report`). `llama_bench`: the
    path of llama.cpp's llama-bench, run on GGUF exports of the same weights. `weight_types`: those
    of DECODE_PATHS decoded with the kernels on and off."""
    unknown = [w for w in weight_types if w not in DECODE_PATHS]
    if unknown or not weight_types:
        raise ValueError(f"--weight-types: {', '.join(unknown) or 'none given'}; choose from {', '.join(DECODE_PATHS)}")
    if with_hf:
        _require_hf()
    config = MixtralConfig.preset(config_name)
    if llama_bench and config.vocab_size != LLAMA_VOCAB:
        raise ValueError(f"--llama-bench needs a config with Mixtral's vocabulary ({LLAMA_VOCAB}; "
                         f"{config_name} has {config.vocab_size}): use --config small")
    report: dict[str, Any] = {"config": config_name, "machine": _machine(), "probes": machine_probes()}

    def body(hf_folder, ckpt):
        from . import checkpoint

        model = checkpoint.load(ckpt, dtype="float32")
        report["jax"] = bench_jax(model, runs)
        del model
        report["decode_paths"] = bench_decode_paths(ckpt, runs, weight_types)
        report["peak_rss_over_weights"] = measure_rss(ckpt) / (4 * _n_params(config))
        if with_hf:
            report["hf"] = bench_hf(hf_folder, config, runs)
        if llama_bench:
            report["llama_cpp"] = bench_llama_cpp(llama_bench, ckpt, runs)
    _with_checkpoints(config, seed, body)
    _derive(report, config)
    return report


def _n_params(config):
    from .model import count_params

    return count_params(config)


def _machine() -> dict[str, Any]:
    import platform

    return {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "backend": jax.default_backend()}


def _derive(report: dict[str, Any], config: MixtralConfig) -> None:
    probes, ours = report["probes"], report["jax"]
    # The read-bandwidth yardstick: the best of the probes and of the weight-read rates that any
    # measured system reached at batch-1 decode (a probe can under-report what a tuned loop gets).
    per_token = active_step_bytes(config, 1)
    rates = {"probe": probes["read_bandwidth"], "mixtral_jax float32": per_token * ours["decode"][1]["tok_s"]}
    rates.update({f"mixtral_jax {k}": per_token * v[1] for k, v in report.get("decode_paths", {}).items()
                  if k.startswith("float32")})
    if "llama_cpp" in report:
        rates["llama.cpp f32"] = per_token * report["llama_cpp"]["f32"]["decode_tok_s"]
    report["weight_read_rates"] = rates
    probes["read_bandwidth"] = max(rates.values())
    for n, r in ours["prefill"].items():
        r["matmul_fraction"] = prefill_flops(config, n) / r["seconds"] / probes["matmul_peak"]
        if "hf" in report:
            hf = report["hf"]["prefill"][n]
            r["speedup_vs_hf"] = r["tok_s"] / hf["tok_s"]
            hf["matmul_fraction"] = prefill_flops(config, n) / hf["seconds"] / probes["matmul_peak"]
    for b, r in ours["decode"].items():
        r["bandwidth_fraction"] = active_step_bytes(config, b) / r["step_s"] / probes["read_bandwidth"]
        if "hf" in report:
            hf = report["hf"]["decode"][b]
            r["speedup_vs_hf"] = r["tok_s"] / hf["tok_s"]
            hf["bandwidth_fraction"] = active_step_bytes(config, b) / hf["step_s"] / probes["read_bandwidth"]


def format_report(report: dict[str, Any]) -> str:
    p = report["probes"]
    lines = [f"config {report['config']}, float32, {report['machine']['cpus']} cpus, jax {report['machine']['jax']}",
             f"machine: read bandwidth {p['read_bandwidth'] / 1e9:.1f} GB/s, "
             f"float32 matmul peak {p['matmul_peak'] / 1e9:.1f} GFLOP/s",
             "", f"{'':22}{'mixtral_jax':>14}{'HF':>12}{'speedup':>10}{'of peak':>10}{'HF of peak':>12}"]
    hf = report.get("hf", {"prefill": {}, "decode": {}})
    for n, r in report["jax"]["prefill"].items():
        h = hf["prefill"].get(n, {})
        lines.append(f"prefill {n:>4} tok/s     {r['tok_s']:>14.1f}{h.get('tok_s', float('nan')):>12.1f}"
                     f"{r.get('speedup_vs_hf', float('nan')):>9.2f}x{r['matmul_fraction']:>9.0%} "
                     f"{h.get('matmul_fraction', float('nan')):>11.0%}")
    for b, r in report["jax"]["decode"].items():
        h = hf["decode"].get(b, {})
        lines.append(f"decode batch {b} tok/s   {r['tok_s']:>14.1f}{h.get('tok_s', float('nan')):>12.1f}"
                     f"{r.get('speedup_vs_hf', float('nan')):>9.2f}x{r['bandwidth_fraction']:>9.0%} "
                     f"{h.get('bandwidth_fraction', float('nan')):>11.0%}")
    s = report["jax"]["compile_sweep"]
    lines += ["", "(prefill: fraction of matmul peak; decode: fraction of read bandwidth)",
              f"compile: {s['programs']} programs, {s['seconds']:.1f} s over prompt lengths {s['prompt_lengths']}",
              "first prefill call (compile included): " + ", ".join(
                  f"{n}: {r['first_call_s']:.1f} s" for n, r in report["jax"]["prefill"].items()),
              f"peak RSS during generation: {report['peak_rss_over_weights']:.2f}x the weight bytes"]
    lines += ["", "read-bandwidth yardstick (best of): " + ", ".join(
        f"{k} {v / 1e9:.1f} GB/s" for k, v in report["weight_read_rates"].items())
        + "; probes: " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in p.items() if k.startswith("read_bandwidth_"))]
    paths = report.get("decode_paths", {})
    if paths:
        f32 = paths.get("float32/on", paths.get("float32/off"))
        lines += ["", f"decode by weight type ({kernels.status()}):"]
        for name, r in paths.items():
            vs = (f" ({r[1] / f32[1]:.2f}x float32)", f" ({r[8] / f32[8]:.2f}x)") if f32 else ("", "")
            lines.append(f"  {name:>14}: batch 1 {r[1]:6.1f} tok/s{vs[0]}, batch 8 {r[8]:6.1f} tok/s{vs[1]}")
        if "llama_cpp" in report:
            for ours, theirs in (("float32/on", "f32"), ("int8/on", "q8_0"), ("bfloat16/on", "f16")):
                if ours in paths:
                    t = report["llama_cpp"][theirs]["decode_tok_s"]
                    lines.append(f"  {ours} vs llama.cpp {theirs}: {paths[ours][1]:.1f} / {t:.1f} = "
                                 f"{paths[ours][1] / t:.2f}x")
    if "llama_cpp" in report:
        ours_pre = report["jax"]["prefill"][PREFILL_LENGTHS[-1]]["tok_s"]
        ours_dec = report["jax"]["decode"][1]["tok_s"]
        lines += ["", f"llama.cpp llama-bench on GGUF exports of the same weights ({os.cpu_count()} threads; "
                      f"ours / theirs):"]
        for kind, r in report["llama_cpp"].items():
            lines.append(f"  {kind:>5}: decode {r['decode_tok_s']:.1f} tok/s (ours f32 {ours_dec / r['decode_tok_s']:.2f}x), "
                         f"prefill {PREFILL_LENGTHS[-1]} {r['prefill_tok_s']:.1f} tok/s "
                         f"(ours f32 {ours_pre / r['prefill_tok_s']:.2f}x)")
    return "\n".join(lines)


if __name__ == "__main__":
    # Child modes, started by measure_rss and _long_measure.
    if sys.argv[1] == "--rss-child":
        rss_child(sys.argv[2])
    elif sys.argv[1] == "--decode-child":
        decode_child(sys.argv[2], sys.argv[3], None if sys.argv[4] == "none" else sys.argv[4], int(sys.argv[5]))
    else:
        long_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
