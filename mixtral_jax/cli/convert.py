"""Checkpoint commands: `convert`, `export`, `info`, and `demo` (the conversion pipeline end to end)."""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np

from .common import UsageError


def cmd_demo(args) -> int:
    """The pipeline end to end on a small random model made on the spot (no download).

    Makes a random 8-expert Mixtral sized for the real Mixtral v1 tokenizer, writes it as a Hugging
    Face safetensors folder, loads it back with `mixtral_jax.load`, checks cached decoding against
    the full forward pass, and greedily continues the prompt. The weights are random, so the text
    is gibberish: the point is the plumbing and its numbers.
    """
    import jax

    import mixtral_jax as mj
    from mixtral_convert import write_folder
    from mixtral_jax.checkpoint import param_items

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    tok = mj.Tokenizer()
    config = mj.MixtralConfig.tiny().replace(vocab_size=tok.vocab_size)
    prompt = tok.encode(args.prompt)
    if len(prompt) + args.max_new_tokens > config.max_seq_len:
        raise UsageError(f"prompt ({len(prompt)} tokens) + --max-new-tokens exceeds the context "
                         f"({config.max_seq_len})")
    params = mj.init_params(config, seed=args.seed)
    n_params = sum(a.size for a in jax.tree.leaves(params))
    with tempfile.TemporaryDirectory(prefix="mixtral-jax-demo-") as tmp:
        folder = os.path.join(tmp, "model")
        write_folder(folder, config, param_items(config, params), "hf", np.float32, tokenizer=tok.path)
        n_files = len([f for f in os.listdir(folder) if f.endswith(".safetensors")])
        print(f"made a random {config.n_experts}-expert top-{config.top_k} Mixtral "
              f"({config.n_layers} layers, d_model {config.d_model}, vocab {config.vocab_size}; "
              f"{n_params / 1e6:.1f} M parameters) as an HF folder of {n_files} safetensors shards")
        model = mj.load(folder)
    print(f"loaded it back with mixtral_jax.load ({model.params['embed'].dtype}, "
          f"tokenizer {'found' if model.tokenizer else 'missing'})")

    total = len(prompt) + args.max_new_tokens
    cache = mj.init_cache(config, 1, total)
    start = time.perf_counter()
    logits, cache = mj.forward(config, model.params, [prompt], cache=cache)
    tokens, last_logits = list(prompt), []
    while True:
        last_logits.append(np.asarray(logits[0, -1]))
        tokens.append(int(np.argmax(last_logits[-1])))
        if len(tokens) == total:
            break
        logits, cache = mj.forward(config, model.params, [tokens[-1:]], cache=cache)
    elapsed = time.perf_counter() - start
    # Cached decoding must reproduce the full forward pass over the same tokens.
    full = np.asarray(mj.forward(config, model.params, [tokens[:-1]]))[0, len(prompt) - 1:]
    diff = float(np.max(np.abs(full - np.stack(last_logits))))
    new = tokens[len(prompt):]
    print(f"prompt {args.prompt!r} -> {len(prompt)} tokens")
    print(f"greedy continuation (random weights): {model.tokenizer.decode(new)!r}")
    print(f"{len(new)} new tokens in {elapsed:.2f} s including compilation; "
          f"cached vs uncached logits max |diff| {diff:.1e}")
    return 0


def cmd_convert(args) -> int:
    from mixtral_convert import convert

    summary = convert(args.src, args.out, dtype=args.dtype, allow_pickle=args.allow_pickle,
                      quantize=args.quantize)
    quant = f", {summary['quantize']} experts and attention" if summary["quantize"] else ""
    print(f"converted {args.src} ({summary['format']}, {summary['bytes'] / 1e9:.3f} GB) to {args.out} "
          f"({summary['dtype']}{quant})")
    return 0


def cmd_export(args) -> int:
    if args.format == "gguf":
        from mixtral_convert.gguf_export import export_gguf

        s = export_gguf(args.ckpt, args.out, gguf_type=args.gguf_type or "f32")
        types = ", ".join(f"{n} {t}" for t, n in sorted(s["types"].items()))
        note = " (int8 weights dequantized and re-quantized to q8_0)" if s["requantized"] else ""
        print(f"exported {args.ckpt} to {args.out} (gguf, {s['tensors']} tensors: {types}; "
              f"{s['bytes'] / 1e6:.1f} MB){note}")
        return 0
    if args.gguf_type:
        raise UsageError("--gguf-type goes with --format gguf")
    from mixtral_convert import export

    export(args.ckpt, args.out, fmt=args.format)
    print(f"exported {args.ckpt} to {args.out} ({args.format})")
    return 0


def cmd_info(args) -> int:
    from mixtral_convert import info

    d = info(args.path)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    c = d["config"]
    quant = f" ({d['quantize']} experts and attention)" if d["quantize"] else ""
    print(f"{d['path']}: {d['format']} checkpoint, {d['dtype']}{quant}, {d['parameters']:,} parameters "
          f"({d['parameters'] / 1e9:.2f} B), {d['bytes_on_disk'] / 1e9:.3f} GB on disk, "
          f"tokenizer {'included' if d['tokenizer'] else 'not included'}")
    print("config: " + ", ".join(f"{k}={v}" for k, v in c.items()))
    return 0


def add_parsers(sub) -> None:
    demo = sub.add_parser("demo", help="run the pipeline end to end on a small random model")
    demo.add_argument("--prompt", default="def fibonacci(n):")
    demo.add_argument("--max-new-tokens", type=int, default=16)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    conv = sub.add_parser("convert", help="PyTorch checkpoint (HF or Mistral folder) -> orbax checkpoint")
    conv.add_argument("src", help="HF folder (config.json) or Mistral folder (params.json)")
    conv.add_argument("out", help="new checkpoint folder (must not exist)")
    conv.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                      help="convert weights to this dtype (default: keep the source's)")
    conv.add_argument("--quantize", choices=["int8"],
                      help="store expert and attention matrices as int8 with per-channel scales")
    conv.add_argument("--allow-pickle", action="store_true",
                      help="accept .pth/.bin pickles (loaded with torch, weights_only=True)")
    conv.set_defaults(func=cmd_convert)

    exp = sub.add_parser("export", help="orbax checkpoint -> HF or Mistral folder, or one GGUF file (llama.cpp)")
    exp.add_argument("ckpt")
    exp.add_argument("out", help="new folder, or new .gguf file with --format gguf (must not exist)")
    exp.add_argument("--format", choices=["hf", "mistral", "gguf"], required=True)
    exp.add_argument("--gguf-type", choices=["f32", "f16", "q8_0"],
                     help="GGUF tensor type for the matrices (default f32; norms and router stay f32)")
    exp.set_defaults(func=cmd_export)

    inf = sub.add_parser("info", help="config, parameter count, dtype, size and format of a checkpoint")
    inf.add_argument("path")
    inf.add_argument("--json", action="store_true")
    inf.set_defaults(func=cmd_info)
