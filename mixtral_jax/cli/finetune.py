"""`finetune` (full or LoRA, on chat or text JSONL) and `merge` (fold an adapter into a checkpoint)."""

from __future__ import annotations

import json
import os

from .common import UsageError


def _base(path: str, mesh=None, dtype="float32", need_tokenizer=True):
    """The model to fine-tune with stacked experts (the training layout); "demo" is the built-in
    model."""
    import mixtral_jax as mj
    from mixtral_jax.checkpoint import demo_model_path
    from mixtral_jax.scoring import tokenizer_for

    model = mj.load(demo_model_path() if path == "demo" else path, dtype=dtype, layout="stacked", mesh=mesh)
    try:
        model.tokenizer = tokenizer_for(model)
    except ValueError as e:
        if need_tokenizer:
            raise UsageError(f"{path}: {e}") from None
    return model


def cmd_finetune(args) -> int:
    import jax

    from mixtral_jax import finetune as ft
    from mixtral_jax import lora as lora_lib
    from mixtral_jax import train as tr
    from mixtral_jax.checkpoint import save
    from mixtral_jax.sharding import make_mesh, parse_mesh

    mesh = make_mesh(**parse_mesh(args.mesh)) if args.mesh else None
    lora = None
    if args.lora is not None:
        lora = lora_lib.LoraConfig(rank=args.lora, alpha=float(args.lora_alpha or 2 * args.lora),
                                   targets=lora_lib.parse_targets(args.lora_targets))
    elif args.lora_alpha is not None or args.lora_targets != "q,k,v,o":
        raise UsageError("--lora-alpha and --lora-targets need --lora RANK")
    lr = args.lr if args.lr is not None else (1e-3 if lora else 1e-4)
    # Full fine-tuning keeps float32 master weights; a LoRA base is frozen, so it stays in the
    # compute dtype (float32 on CPU, bfloat16 on GPU/TPU).
    model = _base(args.checkpoint, mesh, dtype="float32" if lora is None else None)
    seq_len = args.seq_len if args.seq_len is not None else min(512, model.config.max_seq_len)
    tc = tr.TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=seq_len, learning_rate=lr,
                        warmup_steps=args.warmup, weight_decay=args.weight_decay, grad_clip=args.clip,
                        seed=args.seed, log_every=args.log_every, save_every=args.save_every,
                        remat=args.remat, grad_accum=args.grad_accum)
    if tc.seq_len > model.config.max_seq_len:
        raise UsageError(f"--seq-len {tc.seq_len} exceeds the model's context ({model.config.max_seq_len})")
    examples = ft.read_examples(args.data, model.tokenizer, tc.seq_len)  # bad lines: exit 2 before training
    rows = tc.batch_size * tc.grad_accum

    def batches(step):
        return ft.batch(examples, step, rows, tc.seq_len, tc.seed)

    extra = {"data": examples.digest, "base": os.path.abspath(args.checkpoint) if args.checkpoint != "demo" else "demo"}
    if lora is None:
        result = tr.train(model.config, tc, args.out, batches=batches, params=model.params, mesh=mesh,
                          extra_meta=extra)
        written = os.path.join(args.out, "model")
        if not os.path.exists(written):
            save(written, model.config, result["state"].params, dtype=args.export_dtype,
                 tokenizer=model.tokenizer.path, generation_config=model.generation_config or None)
    else:
        result = tr.train(model.config, tc, args.out, batches=batches, base=model.params, lora=lora, mesh=mesh,
                          extra_meta=extra)
        written = os.path.join(args.out, "adapter")
        lora_lib.save_adapter(written, result["state"].params, lora)
    last = result["history"][-1] if result["history"] else {}
    print(json.dumps({"steps": int(result["state"].step), "loss": last.get("loss"), "examples": len(examples),
                      "truncated": examples.truncated, "lora": args.lora is not None,
                      "trainable_params": (lora_lib.count_adapter_params(model.config, lora) if lora else
                                           sum(a.size for a in jax.tree.leaves(model.params))),
                      "output": written}))
    return 0


def cmd_merge(args) -> int:
    from mixtral_jax import lora as lora_lib
    from mixtral_jax.checkpoint import save

    if os.path.exists(args.out):
        raise UsageError(f"{args.out}: already exists")
    model = _base(args.checkpoint, need_tokenizer=False)
    adapter, lora = lora_lib.load_adapter(args.adapter, model.config)
    merged = lora_lib.merge(model.params, adapter, lora)
    save(args.out, model.config, merged, dtype=args.dtype, tokenizer=model.tokenizer and model.tokenizer.path,
         generation_config=model.generation_config or None)
    print(json.dumps({"merged": args.out, "rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets)}))
    return 0


def add_parsers(sub) -> None:
    ft = sub.add_parser("finetune", help="fine-tune a checkpoint on chat or text JSONL (full, or LoRA with --lora)")
    ft.add_argument("checkpoint", help='project checkpoint, HF or Mistral folder, or "demo"')
    ft.add_argument("data", help='JSONL: {"messages": [...]} (loss on the answers) or {"text": ...} per line; '
                                  '"sample" for the shipped chat sample')
    ft.add_argument("out", help="run folder: checkpoints/, metrics.jsonl, then model/ or adapter/ (resumes if present)")
    ft.add_argument("--lora", type=int, metavar="RANK", help="train a LoRA adapter of this rank instead of every weight")
    ft.add_argument("--lora-alpha", type=float, help="LoRA scale numerator: the update is (alpha/rank) B A x "
                                                     "(default 2 x rank)")
    ft.add_argument("--lora-targets", default="q,k,v,o", help="adapted matrices among q,k,v,o,experts (default q,k,v,o)")
    ft.add_argument("--mesh", help="e.g. fsdp=8 or fsdp=4,expert=2 (default one device)")
    ft.add_argument("--steps", type=int, default=100)
    ft.add_argument("--batch-size", type=int, default=8)
    ft.add_argument("--seq-len", type=int, help="tokens per row; longer examples are cut (default: 512, or the "
                                                "model's context if shorter)")
    ft.add_argument("--lr", type=float, help="peak learning rate (default 1e-3 with --lora, 1e-4 without)")
    ft.add_argument("--warmup", type=int, default=10, help="linear warm-up steps")
    ft.add_argument("--weight-decay", type=float, default=0.0)
    ft.add_argument("--clip", type=float, default=1.0, help="gradient global-norm clip")
    ft.add_argument("--remat", choices=["none", "layer", "dots"], default="none",
                    help="recompute each decoder layer in the backward pass (layer), or all but its matmuls (dots)")
    ft.add_argument("--grad-accum", type=int, default=1, help="micro-batches of --batch-size rows per step")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--log-every", type=int, default=10)
    ft.add_argument("--save-every", type=int, default=50)
    ft.add_argument("--export-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="dtype of OUT/model (full fine-tuning)")
    ft.set_defaults(func=cmd_finetune)

    mg = sub.add_parser("merge", help="fold a LoRA adapter into its base: a checkpoint export and load take")
    mg.add_argument("checkpoint", help='the base the adapter was trained on (or "demo")')
    mg.add_argument("adapter", help="the adapter folder (finetune --lora writes OUT/adapter)")
    mg.add_argument("out", help="the merged checkpoint folder to create")
    mg.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="stored dtype (default float32)")
    mg.set_defaults(func=cmd_merge)
