"""Load benchmark: a running `mixtral-jax serve` under concurrent streaming requests, beside static
`generate` batches of the same requests.

Requests have mixed prompt and output lengths drawn with a fixed seed (prompts of random tokens,
sent as token ids; greedy; EOS ignored on both sides: `min_tokens` is not an OpenAI field, so the
server is started with stop tokens disabled by the `--ignore-eos` of this script's own server). All
traffic goes to 127.0.0.1; the run is bounded in requests and in time. Reported, with vLLM's
`benchmark_serving` definitions: TTFT, TPOT = (e2e - TTFT) / (output tokens - 1), inter-token
latency, each p50 and p99; request and output-token throughput; failures. Then the same requests
through `mixtral_jax.generate` in static batches of --batch in arrival order (each batch runs to its
longest request), for the throughput ratio.

    python benchmarks/serve_load.py --config small --slots 8 --requests 32          # starts its own server
    python benchmarks/serve_load.py --demo --concurrency 1,8,16 --requests 32       # TTFT/TPOT per level
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model NAME ...    # an existing server

The `openai` package is a benchmark/test extra (pip install -e '.[dev]'), never a runtime import.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

TIME_LIMIT_S = 1800


def draw_requests(n: int, seed: int, vocab: int, prompt_range=(16, 512), output_range=(16, 128)):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = int(rng.integers(prompt_range[0], prompt_range[1] + 1))
        out.append({"prompt": [1] + rng.integers(3, vocab, p - 1).tolist(),
                    "max_tokens": int(rng.integers(output_range[0], output_range[1] + 1))})
    return out


async def one(client, model: str, req: dict, results: list, deadline: float) -> None:
    start = time.perf_counter()
    times = []
    try:
        stream = await client.completions.create(model=model, prompt=req["prompt"], max_tokens=req["max_tokens"],
                                                 temperature=0, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text is not None and chunk.choices[0].finish_reason is None:
                times.append(time.perf_counter())
            if time.perf_counter() > deadline:
                raise TimeoutError("benchmark time limit")
        results.append({"ok": True, "start": start, "end": time.perf_counter(), "token_times": times,
                        "prompt": len(req["prompt"]), "output": req["max_tokens"]})
    except Exception as e:  # noqa: BLE001 - counted as a failure
        results.append({"ok": False, "error": f"{type(e).__name__}: {e}"})


async def drive(url: str, model: str, requests: list, concurrency: int) -> dict:
    import openai

    # A server started with an API key (`serve --api-key`, or $MIXTRAL_JAX_API_KEY) is driven with it.
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=os.environ.get("MIXTRAL_JAX_API_KEY", "unused"),
                                max_retries=0, timeout=600)
    results: list = []
    deadline = time.perf_counter() + TIME_LIMIT_S
    gate = asyncio.Semaphore(concurrency)

    async def limited(req):
        async with gate:
            await one(client, model, req, results, deadline)

    start = time.perf_counter()
    await asyncio.gather(*(limited(r) for r in requests))
    wall = time.perf_counter() - start
    await client.close()
    return summarize(results, wall)


def _pct(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(results: list, wall: float) -> dict:
    ok = [r for r in results if r["ok"]]
    ttft = [r["token_times"][0] - r["start"] for r in ok if r["token_times"]]
    tpot = [(r["end"] - r["token_times"][0]) / (len(r["token_times"]) - 1) for r in ok if len(r["token_times"]) > 1]
    itl = [b - a for r in ok for a, b in zip(r["token_times"], r["token_times"][1:])]
    tokens = sum(len(r["token_times"]) for r in ok)
    return {"requests": len(results), "failures": len(results) - len(ok), "wall_s": wall,
            "request_throughput": len(ok) / wall, "output_token_throughput": tokens / wall,
            "ttft_p50": _pct(ttft, 50), "ttft_p99": _pct(ttft, 99), "tpot_p50": _pct(tpot, 50),
            "tpot_p99": _pct(tpot, 99), "itl_p50": _pct(itl, 50), "itl_p99": _pct(itl, 99),
            "ttft_short_prompts_p99": _pct([r["token_times"][0] - r["start"] for r in ok
                                            if r["token_times"] and r["prompt"] <= 64], 99),
            "errors": sorted({r["error"] for r in results if not r["ok"]})[:5]}


def idle_ttft(url: str, model: str, requests: list) -> float:
    """Median TTFT of the short-prompt requests sent one at a time to an idle server."""
    short = [r for r in requests if len(r["prompt"]) <= 64][:5] or requests[:3]
    s = asyncio.run(drive(url, model, [dict(r, max_tokens=2) for r in short], 1))
    return s["ttft_p50"]


def static_batches(model, requests: list, batch: int) -> dict:
    """The same requests through `generate` in arrival-order batches (each to its longest)."""
    from mixtral_jax import generate

    def run_all() -> int:
        tokens = 0
        for i in range(0, len(requests), batch):
            group = requests[i:i + batch]
            out = generate(model, [r["prompt"] for r in group], max_new_tokens=[r["max_tokens"] for r in group],
                           stop_tokens=[])
            tokens += sum(map(len, out))
        return tokens

    run_all()  # every batch's program compiled outside the clock, as the server compiles at start-up
    start = time.perf_counter()
    tokens = run_all()
    wall = time.perf_counter() - start
    return {"wall_s": wall, "request_throughput": len(requests) / wall, "output_token_throughput": tokens / wall}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args_list: list, timeout: float = 1200, env: dict | None = None):
    """Start `mixtral-jax serve ARGS` (with `env` added to the environment) on a free 127.0.0.1 port
    and wait, bounded, for /health to say 200; returns (url, process). RuntimeError (with the
    server's stderr) if it exits or times out. Shared by the serving tests."""
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mixtral_jax.cli", "serve", "--port", str(port),
                             *map(str, args_list)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"server not healthy within {timeout} s")


def stop_server(proc) -> None:
    """SIGTERM the server by its pid; SIGKILL if it has not exited 30 s later."""
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an existing server (else one is started here)")
    parser.add_argument("--model", help="the served model name (with --url)")
    parser.add_argument("--config", default="small", help="random-weight config to serve (default small)")
    parser.add_argument("--demo", action="store_true", help="serve the built-in demo model instead")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--prefill-chunk", type=int, help="the started server's --prefill-chunk (default: serve's)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", default="32", help="comma-separated levels (default: all at once)")
    parser.add_argument("--batch", type=int, default=8, help="static batch size for the comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-static", action="store_true", help="skip the static-batch comparison")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import mixtral_jax as mj
    from mixtral_jax.checkpoint import demo_model_path, save

    tmp = tempfile.TemporaryDirectory(prefix="serve-load-")
    proc = None
    if args.url:
        url, model_name, path = args.url, args.model, None
    else:
        if args.demo:
            path, model_name = demo_model_path(), "demo"
        else:
            config = mj.MixtralConfig.preset(args.config)
            path, model_name = os.path.join(tmp.name, args.config), args.config
            save(path, config, mj.init_params(config, seed=args.seed), tokenizer=mj.Tokenizer().path)
        chunk = [] if args.prefill_chunk is None else ["--prefill-chunk", args.prefill_chunk]
        url, proc = start_server(["--checkpoint", path, "--model-name", model_name, "--slots", args.slots,
                                  "--ignore-eos", *chunk])
    try:
        vocab = 32000
        max_prompt = 512 if not args.demo else 300          # the demo's context is 512
        max_out = 128 if not args.demo else 128
        requests = draw_requests(args.requests, args.seed, vocab, (16, max_prompt), (16, max_out))
        report = {"url": url, "model": model_name, "slots": args.slots, "requests": args.requests, "levels": {}}
        report["idle_short_prompt_ttft"] = idle_ttft(url, model_name, requests)
        for level in (int(c) for c in args.concurrency.split(",")):
            report["levels"][level] = asyncio.run(drive(url, model_name, requests, level))
    finally:
        if proc is not None:
            stop_server(proc)
    if not args.no_static and path is not None:
        report["static"] = static_batches(mj.load(path), requests, args.batch)
        top = report["levels"][max(report["levels"])]
        report["throughput_vs_static"] = top["request_throughput"] / report["static"]["request_throughput"]
    tmp.cleanup()
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{model_name}: {args.requests} requests, {args.slots} slots; idle TTFT (short prompts) "
          f"{report['idle_short_prompt_ttft'] * 1e3:.0f} ms")
    for level, s in report["levels"].items():
        print(f"concurrency {level:>3}: {s['request_throughput']:.2f} req/s, {s['output_token_throughput']:.1f} tok/s, "
              f"TTFT p50/p99 {s['ttft_p50'] * 1e3:.0f}/{s['ttft_p99'] * 1e3:.0f} ms (prompts <= 64: p99 "
              f"{s['ttft_short_prompts_p99'] * 1e3:.0f} ms), TPOT p50/p99 {s['tpot_p50'] * 1e3:.1f}/"
              f"{s['tpot_p99'] * 1e3:.1f} ms, ITL p50/p99 {s['itl_p50'] * 1e3:.1f}/{s['itl_p99'] * 1e3:.1f} ms, "
              f"failures {s['failures']}")
    if "static" in report:
        st = report["static"]
        print(f"static batches of {args.batch}: {st['request_throughput']:.2f} req/s, "
              f"{st['output_token_throughput']:.1f} tok/s; served / static request throughput "
              f"{report['throughput_vs_static']:.2f}x")


if __name__ == "__main__":
    main()
