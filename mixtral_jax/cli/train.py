"""`train`: train (or resume) a model on the built-in corpus (TRAINING.md)."""

from __future__ import annotations

import argparse
import json
import os

from .common import UsageError, read_json_file


def cmd_train(args) -> int:
    """Train (or resume) a run in OUT; at the end write OUT/model, a checkpoint `--checkpoint` takes."""
    import mixtral_jax as mj
    from mixtral_jax import train as tr
    from mixtral_jax.checkpoint import save
    from mixtral_jax.corpus import build_corpus, load_corpus

    out = args.out or args.out_flag
    if not out:
        raise UsageError("train needs an output folder: mixtral-jax train OUT")
    if args.config:
        config = mj.MixtralConfig.from_dict(read_json_file(args.config))
    else:
        config = mj.MixtralConfig.preset(args.preset)
    tok = mj.Tokenizer()
    if config.vocab_size != tok.vocab_size:
        raise UsageError(f"the corpus uses the Mixtral v1 tokenizer ({tok.vocab_size} tokens); the model's "
                         f"vocab_size is {config.vocab_size}")
    try:
        weights = tuple(float(w) for w in args.domain_weights.split(","))
    except ValueError:
        raise UsageError(f"--domain-weights: expected three numbers like 0.6,0.25,0.15, got {args.domain_weights!r}") from None
    tc = tr.TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                        learning_rate=args.lr, warmup_steps=args.warmup, weight_decay=args.weight_decay,
                        grad_clip=args.clip, z_loss_coef=args.z_loss, seed=args.seed,
                        log_every=args.log_every, eval_every=args.eval_every, save_every=args.save_every,
                        keep=args.keep, domain_weights=weights, remat=args.remat, grad_accum=args.grad_accum)
    if tc.seq_len > config.max_seq_len:
        raise UsageError(f"--seq-len {tc.seq_len} exceeds the model's context ({config.max_seq_len})")
    mesh = None
    if args.mesh:
        from mixtral_jax.sharding import make_mesh, parse_mesh

        mesh = make_mesh(**parse_mesh(args.mesh))
    corpus_dir = args.corpus or os.path.join(out, "corpus")
    packages = tuple(p for p in (args.corpus_packages or "").split(",") if p)
    if args.max_package_tokens is not None and args.max_package_tokens < 1:
        raise UsageError(f"--max-package-tokens must be >= 1, got {args.max_package_tokens}")
    build_corpus(corpus_dir, tokenizer=tok, packages=packages, max_package_tokens=args.max_package_tokens,
                 strip_docstrings=args.strip_docstrings)
    params = None
    if args.init:
        start = mj.load(args.init, dtype="float32", layout="stacked")
        if start.config != config:
            raise UsageError(f"--init {args.init}: its config differs from the model's ({start.config} vs {config})")
        params = start.params
    result = tr.train(config, tc, out, load_corpus(corpus_dir), mesh=mesh, params=params)
    model_dir = os.path.join(out, "model")
    if not os.path.exists(model_dir):
        save(model_dir, config, result["state"].params, dtype=args.export_dtype, tokenizer=tok.path)
    last = result["history"][-1] if result["history"] else {}
    print(json.dumps({"steps": int(result["state"].step), "loss": last.get("loss"),
                      "eval": result["eval"], "model": model_dir}))
    return 0


def add_parsers(sub) -> None:
    tr = sub.add_parser("train", help="train a model on the built-in corpus (code, prose, math)")
    tr.add_argument("out", nargs="?", help="run folder: checkpoints/, metrics.jsonl, model/ (resumes if present)")
    tr.add_argument("--out", dest="out_flag", help=argparse.SUPPRESS)
    tr.add_argument("--preset", default="demo", help="model preset (default demo)")
    tr.add_argument("--config", help="model config JSON (MixtralConfig fields) instead of a preset")
    tr.add_argument("--corpus", help="corpus folder, built there if missing (default OUT/corpus)")
    tr.add_argument("--steps", type=int, default=1000)
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--seq-len", type=int, default=512)
    tr.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    tr.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    tr.add_argument("--weight-decay", type=float, default=0.1)
    tr.add_argument("--clip", type=float, default=1.0, help="gradient global-norm clip")
    tr.add_argument("--z-loss", type=float, default=0.0, help="router z-loss coefficient")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--log-every", type=int, default=10)
    tr.add_argument("--eval-every", type=int, default=100)
    tr.add_argument("--save-every", type=int, default=50)
    tr.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    tr.add_argument("--mesh", help="e.g. data=2, fsdp=8 or fsdp=4,expert=2 (over host devices)")
    tr.add_argument("--remat", choices=["none", "layer", "dots"], default="none",
                    help="recompute each decoder layer in the backward pass (layer), or all but its matmuls (dots)")
    tr.add_argument("--grad-accum", type=int, default=1, help="micro-batches of --batch-size rows per step")
    tr.add_argument("--domain-weights", default="0.6,0.25,0.15",
                    help="share of training rows drawn from code,prose,math")
    tr.add_argument("--corpus-packages", help="comma-separated installed packages whose Python sources "
                                              "add training code and prose (TRAINING.md)")
    tr.add_argument("--max-package-tokens", type=int, help="code tokens taken per package at most")
    tr.add_argument("--strip-docstrings", action="store_true",
                    help="training code without docstrings (prose keeps them; held-out code unchanged)")
    tr.add_argument("--init", metavar="CKPT", help="start from this checkpoint's weights (same config) "
                                                   "instead of a random init")
    tr.add_argument("--export-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="dtype of OUT/model")
    tr.set_defaults(func=cmd_train)
