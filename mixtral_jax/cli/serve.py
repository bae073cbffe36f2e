"""`serve`: the OpenAI-compatible server (mixtral_jax.serving)."""

from __future__ import annotations

import os

from .common import UsageError, add_model_args, load_model

API_KEY_ENV = "MIXTRAL_JAX_API_KEY"


def cmd_serve(args) -> int:
    import jax

    from mixtral_jax.serving.engine import Engine
    from mixtral_jax.serving.server import serve

    for flag in ("slots", "max_queue"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    model = load_model(args)
    if model.tokenizer is None:
        raise UsageError("serve needs a tokenizer; this checkpoint has none and its vocabulary is not Mixtral's")
    if args.max_seq_len is not None and not 1 < args.max_seq_len <= model.config.max_seq_len:
        raise UsageError(f"--max-seq-len must be in [2, {model.config.max_seq_len}] (the model's context), "
                         f"got {args.max_seq_len}")
    name = args.model_name or ("demo" if not args.checkpoint else
                               os.path.basename(os.path.normpath(args.checkpoint)))
    engine = Engine(model, slots=args.slots, max_seq_len=args.max_seq_len, prefill_chunk=args.prefill_chunk,
                    max_queue=args.max_queue, kv_dtype=args.kv_dtype, attention=args.attention,
                    stop_tokens=[] if args.ignore_eos else model.generation_config_kwargs().get("stop_tokens"))
    if jax.process_index() != 0:  # multi-host: process 0 serves HTTP; the others mirror its device calls
        engine.follow()
        return 0
    serve(engine, name, args.host, args.port, api_key=args.api_key or None)
    return 0


def add_parsers(sub) -> None:
    from mixtral_jax.attention import IMPLEMENTATIONS
    from mixtral_jax.kvcache import DTYPES

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    add_model_args(sv)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--slots", type=int, default=8, help="requests decoded together (default 8)")
    sv.add_argument("--max-seq-len", type=int, help="prompt + new tokens per request (default: the model's context)")
    sv.add_argument("--max-queue", type=int, default=64,
                    help="requests waiting for a slot before 429 (default 64); one request's n x prompts above it: 400")
    sv.add_argument("--model-name", help='the name clients send as "model" (default: the checkpoint folder\'s '
                                         'name; "demo" for the built-in model)')
    sv.add_argument("--prefill-chunk", type=int, default=256,
                    help="prompt tokens read per engine step, a power of two >= 16 (default 256: bounds how long "
                         "running streams and new short prompts wait behind a long prompt)")
    sv.add_argument("--kv-dtype", choices=DTYPES, help="KV cache dtype (default: the model's)")
    sv.add_argument("--attention", choices=IMPLEMENTATIONS, default="auto")
    sv.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                    help=f"require `Authorization: Bearer KEY` on /v1/ (401 otherwise; /health and /metrics stay "
                         f"open); default ${API_KEY_ENV}, so the key need not show in the process list")
    sv.add_argument("--ignore-eos", action="store_true",
                    help="no stop tokens: every request runs to max_tokens or a stop string (load benchmarks)")
    sv.set_defaults(func=cmd_serve)
