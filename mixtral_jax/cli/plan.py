"""`plan` (per-device memory, nothing allocated) and `bench` (side-by-side speed against HF)."""

from __future__ import annotations

import json
import math
import os

from .common import UsageError


def cmd_plan(args) -> int:
    import mixtral_jax as mj
    from mixtral_jax.plan import parse_bytes, plan_memory
    from mixtral_jax.sharding import parse_mesh

    if (args.preset is None) == (args.checkpoint is None):
        raise UsageError("give either --preset NAME or --checkpoint PATH")
    if args.preset is not None:
        config = mj.MixtralConfig.preset(args.preset)
    else:
        from mixtral_convert import info

        config = mj.MixtralConfig.from_dict(info(args.checkpoint)["config"])
    sizes = parse_mesh(args.mesh)
    device_memory = parse_bytes(args.device_memory) if args.device_memory else None
    if args.prefill_chunk is not None and args.prefill_chunk < 0:
        raise UsageError(f"--prefill-chunk must be >= 0, got {args.prefill_chunk}")
    if args.train:
        return _plan_train(args, config, sizes, device_memory)
    if args.lora is not None:
        raise UsageError("--lora plans training: add --train")
    p = plan_memory(config, sizes, dtype=args.dtype, batch=args.batch, max_seq_len=args.max_seq_len,
                    prompt_len=args.prompt_len, quantize=args.quantize, kv_dtype=args.kv_dtype,
                    prefill_chunk=args.prefill_chunk)
    result = _result(args, p, device_memory, mesh=sizes, devices=math.prod(sizes.values()), dtype=args.dtype,
                     quantize=args.quantize, batch=args.batch, max_seq_len=args.max_seq_len or config.max_seq_len)
    if result is None:
        return 0
    gb = lambda n: f"{n / 1e9:8.2f} GB"  # noqa: E731
    mesh_text = ",".join(f"{k}={v}" for k, v in sizes.items())
    quant = " with int8 experts and attention" if args.quantize else ""
    print(f"per-device memory, {args.dtype}{quant}, mesh {mesh_text} ({result['devices']} devices), batch "
          f"{args.batch}, KV cache {result['max_seq_len']} tokens per row:")
    for group, n in p["weights"].items():
        print(f"  weights: {group:<14}{gb(n)}")
    print(f"  weights total         {gb(p['weights_total'])}")
    print(f"  KV cache ({p['kv_dtype']:<8})    {gb(p['kv_cache'])}")
    print(f"  activations (peak)    {gb(p['activations'])}  (prefill step {gb(p['prefill_activations']).strip()}, "
          f"decode step {gb(p['decode_activations']).strip()})")
    print(f"  total                 {gb(p['total'])}")
    if device_memory is not None:
        verdict = "fits" if result["fits"] else "does NOT fit"
        print(f"{verdict} in {device_memory / 1e9:.2f} GB per device")
    return 0


def _result(args, p, device_memory, **fields) -> dict | None:
    """The plan's result dict, or None once printed as JSON (--json)."""
    result = {**fields, "per_device_bytes": p, "device_memory": device_memory,
              "fits": None if device_memory is None else p["total"] <= device_memory}
    if args.json:
        print(json.dumps(result, indent=2))
        return None
    return result


def _plan_train(args, config, sizes, device_memory) -> int:
    from mixtral_jax.lora import LoraConfig, parse_targets
    from mixtral_jax.plan import plan_training

    lora = None if args.lora is None else LoraConfig(rank=args.lora, alpha=2.0 * args.lora,
                                                     targets=parse_targets(args.lora_targets))
    p = plan_training(config, sizes, batch=args.batch, seq_len=args.seq_len, remat=args.remat,
                      compute_dtype=args.dtype, lora=lora)
    result = _result(args, p, device_memory, mode="lora" if lora else "full", mesh=sizes,
                     devices=math.prod(sizes.values()), compute_dtype=args.dtype, batch=args.batch,
                     seq_len=args.seq_len, remat=args.remat,
                     lora=None if lora is None else {"rank": lora.rank, "targets": list(lora.targets)})
    if result is None:
        return 0
    gb = lambda n: f"{n / 1e9:9.2f} GB"  # noqa: E731
    mesh_text = ",".join(f"{k}={v}" for k, v in sizes.items())
    what = f"LoRA rank {lora.rank} on {','.join(lora.targets)}" if lora else "full fine-tuning"
    print(f"per-device training memory, {what}, AdamW, {args.dtype} compute, mesh {mesh_text} "
          f"({result['devices']} devices), batch {args.batch} x {args.seq_len} tokens, remat {args.remat}:")
    print(f"  parameters            {gb(p['parameters'])}" + ("  (frozen base + adapter)" if lora else "  (float32 master)"))
    if p["compute_copy"]:
        print(f"  {args.dtype} copy         {gb(p['compute_copy'])}")
    print(f"  gradients             {gb(p['gradients'])}")
    print(f"  optimizer state       {gb(p['optimizer_state'])}")
    print(f"  activations (est.)    {gb(p['activations'])}")
    print(f"  total                 {gb(p['total'])}")
    print(f"  trainable parameters  {p['trainable_params'] / 1e9:9.3f} B")
    if device_memory is not None:
        verdict = "fits" if result["fits"] else "does NOT fit"
        print(f"{verdict} in {device_memory / 1e9:.2f} GB per device")
    return 0


def cmd_bench(args) -> int:
    from mixtral_jax import bench

    if args.runs < 1:
        raise UsageError(f"--runs must be >= 1, got {args.runs}")
    if args.long:
        report = bench.run_long(args.config, with_hf=not args.no_hf)
        print(json.dumps(report, indent=2) if args.json else bench.format_long(report))
        return 0
    llama_bench = args.llama_bench or os.environ.get("LLAMA_BENCH")
    if llama_bench and not os.path.isfile(llama_bench):
        raise UsageError(f"--llama-bench {llama_bench}: no such file")
    weight_types = tuple(w.strip() for w in args.weight_types.split(",") if w.strip())
    report = bench.run(args.config, runs=args.runs, with_hf=not args.no_hf, llama_bench=llama_bench,
                       weight_types=weight_types)
    print(json.dumps(report, indent=2) if args.json else bench.format_report(report))
    return 0


def add_parsers(sub) -> None:
    plan = sub.add_parser("plan", help="per-device memory of a model on a mesh (nothing is allocated)")
    plan.add_argument("--preset", help="mixtral-8x7b, mixtral-8x22b, small or tiny")
    plan.add_argument("--checkpoint", help="plan for a checkpoint's config instead of a preset")
    plan.add_argument("--mesh", default="data=1,expert=1,tensor=1", help="e.g. data=1,expert=8,tensor=1")
    plan.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    plan.add_argument("--batch", type=int, default=1)
    plan.add_argument("--max-seq-len", type=int, help="KV cache tokens per row (default: the context)")
    plan.add_argument("--prompt-len", type=int, default=512, help="prefill length for the activation estimate")
    plan.add_argument("--prefill-chunk", type=int, help="prompt tokens per prefill step (default: the whole prompt)")
    plan.add_argument("--kv-dtype", choices=["float32", "bfloat16", "float16", "int8"],
                      help="KV cache dtype (default: --dtype); int8 adds a float32 scale per token and head")
    plan.add_argument("--device-memory", help="e.g. 16GB: say whether the plan fits")
    plan.add_argument("--quantize", choices=["int8"], help="int8 expert and attention weights")
    plan.add_argument("--train", action="store_true", help="plan a training step instead: parameters, "
                                                           "gradients, optimizer state, activations")
    plan.add_argument("--lora", type=int, metavar="RANK", help="with --train: LoRA of this rank")
    plan.add_argument("--lora-targets", default="q,k,v,o", help="with --lora: q,k,v,o[,experts]")
    plan.add_argument("--seq-len", type=int, default=4096, help="with --train: tokens per row (default 4096)")
    plan.add_argument("--remat", choices=["none", "layer", "dots"], default="layer",
                      help="with --train: rematerialisation (default layer)")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=cmd_plan)

    bench = sub.add_parser("bench", help="side-by-side speed against HF transformers (float32, CPU)")
    bench.add_argument("--config", choices=["small", "tiny"], default="small")
    bench.add_argument("--runs", type=int, default=5, help="timed runs per figure (median)")
    bench.add_argument("--no-hf", action="store_true", help="skip the HF transformers side")
    bench.add_argument("--long", action="store_true",
                       help="instead: prefill of 4k and 16k-token prompts (tok/s, peak RSS) beside HF with sdpa")
    bench.add_argument("--llama-bench", metavar="PATH",
                       help="also run llama.cpp's llama-bench (default: $LLAMA_BENCH) on GGUF exports (f32, f16, "
                            "q8_0) of the same weights")
    bench.add_argument("--weight-types", default="float32,bfloat16,int8", metavar="LIST",
                       help="weight types decoded with the CPU kernels on and off, each in its own process "
                            "(default float32,bfloat16,int8)")
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=cmd_bench)
