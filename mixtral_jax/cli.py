"""The `mixtral-jax` command line.

Exit codes: 0 success, 2 usage or input errors (one line on stderr, no traceback), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

import numpy as np

PROG = "mixtral-jax"


class UsageError(Exception):
    """Bad arguments or input: exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        raise UsageError(message)


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


SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "seed")


def load_model(args):
    """The model named by --checkpoint, else the built-in demo model (with its tokenizer, else
    Mixtral's when the vocabulary fits), with the routing interventions the command has flags for."""
    import mixtral_jax as mj
    from mixtral_jax.checkpoint import demo_model_path
    from mixtral_jax.scoring import tokenizer_for

    path = args.checkpoint or demo_model_path()
    mesh = None
    if args.mesh:
        from mixtral_jax.sharding import make_mesh, parse_mesh

        mesh = make_mesh(**parse_mesh(args.mesh))
    model = mj.load(path, dtype=args.dtype, mesh=mesh)
    try:
        model.tokenizer = tokenizer_for(model)
    except ValueError:
        pass  # token-id inputs still work; text inputs report the missing tokenizer
    if getattr(args, "route_top_k", None) or getattr(args, "disable_experts", None) or getattr(args, "force_experts", None):
        from mixtral_jax.routing import intervene

        model = intervene(model, top_k=args.route_top_k, disabled=_expert_list(args.disable_experts),
                          forced=_expert_list(args.force_experts))
    return model


def _expert_list(text: str | None) -> list[int]:
    try:
        return [int(x) for x in (text or "").split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"bad expert list {text!r}: expected e.g. 3,5") from None


def _add_intervention_args(p) -> None:
    p.add_argument("--top-k", dest="route_top_k", type=int, help="experts per token (default: the model's)")
    p.add_argument("--disable-experts", help="comma-separated experts never routed to, in every layer")
    p.add_argument("--force-experts", help="comma-separated experts always routed to, in every layer")


def cmd_routing(args) -> int:
    from mixtral_jax import routing

    texts = []
    labels = args.labels.split(",") if args.labels else [os.path.splitext(os.path.basename(f))[0] for f in args.files]
    if len(labels) != len(args.files):
        raise UsageError(f"--labels gives {len(labels)} labels for {len(args.files)} files")
    for label, path in zip(labels, args.files):
        try:
            with open(path, encoding="utf-8") as f:
                texts.append((label, f.read()))
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{path}: cannot read ({e})") from None
    model = load_model(args)
    layers = routing.parse_layers(args.layers, model.config.n_layers)
    report = routing.analyse(model, texts, layers)
    if args.html:
        page = routing.to_html(report, model.tokenizer)
        _write_atomically(args.html, lambda f: f.write(page.encode("utf-8")))
    if args.plot:
        _write_atomically(args.plot, lambda f: routing.plot(report, f))
    if args.json:
        print(json.dumps(routing.summary(report)))
        return 0
    base = report["random_baseline"]
    print(f"{report['experts']} experts, top-{report['top_k']}; random routing: same first choice "
          f"{base['consecutive_same_top1']:.3f}, share any of two {base['consecutive_share_any']:.3f}")
    for layer in report["per_layer"]:
        print(f"layer {layer['layer']}:")
        for d, r in layer["domains"].items():
            shares = " ".join(f"{x:.2f}" for x in r["top1_share"])
            print(f"  {d:>10} {r['tokens']:>6} tokens  same 1st {r['consecutive_same_top1']:.3f}  "
                  f"any of 2 {r['consecutive_share_any']:.3f}  entropy {r['routing_entropy']:.2f}  "
                  f"1st-choice shares {shares}")
    return 0


def _write_atomically(path: str, write) -> None:
    """Write through a temporary sibling renamed into place: no half-written file on failure."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{path}: folder does not exist")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".partial-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _sampling(args) -> dict:
    return {name: getattr(args, name) for name in SAMPLING_FIELDS}


def _prompt_ids(model, text: str, chat: bool) -> list[int]:
    if model.tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer; give token ids instead of text")
    if chat:
        return model.tokenizer.encode_chat([{"role": "user", "content": text}])
    return model.tokenizer.encode(text, bos=True)


def _stream_text(model, ids, sampling, out=sys.stdout) -> list[int]:
    """Print a single row's continuation as it is generated; return its tokens."""
    from mixtral_jax import generate_stream

    new: list[int] = []
    printed = ""
    for step in generate_stream(model, [ids], **sampling):
        if step[0] is None:
            break
        new.append(step[0])
        text = model.tokenizer.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text[len(printed):])
            out.flush()
            printed = text
    out.write(model.tokenizer.decode(new)[len(printed):] + "\n")
    return new


def cmd_generate(args) -> int:
    from mixtral_jax import generate

    if (args.prompt is None) == (args.input is None):
        raise UsageError("give either --prompt TEXT or --input FILE --output FILE")
    if (args.input is None) != (args.output is None):
        raise UsageError("--input and --output go together")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    model = load_model(args)
    if args.input is not None:
        return _generate_file(model, args)
    ids = _prompt_ids(model, args.prompt, args.chat)
    sampling = _sampling(args)
    if args.stream:
        _stream_text(model, ids, sampling)
    else:
        print(model.tokenizer.decode(generate(model, [ids], **sampling)[0]))
    return 0


def _parse_line(model, line: str, args) -> tuple[list[int], dict]:
    """One JSONL record -> (prompt ids, sampling); ValueError with the reason when invalid."""
    from mixtral_jax.sampler import prepare

    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from None
    if not isinstance(rec, dict) or ("prompt" in rec) == ("tokens" in rec):
        raise ValueError('expected an object with exactly one of "prompt" or "tokens"')
    unknown = set(rec) - {"prompt", "tokens", *SAMPLING_FIELDS}
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
    if "prompt" in rec:
        if not isinstance(rec["prompt"], str):
            raise ValueError('"prompt" must be a string')
        ids = _prompt_ids(model, rec["prompt"], args.chat)
    else:
        ids = rec["tokens"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError('"tokens" must be a list of integers')
    sampling = {**_sampling(args), **{k: rec[k] for k in SAMPLING_FIELDS if k in rec}}
    for k, v in sampling.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{k} must be a number")
    prepare(model, [ids], **sampling)  # the same host-side checks as generate
    return ids, sampling


def _is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


def _generate_file(model, args) -> int:
    from tqdm import tqdm

    from mixtral_jax import generate

    try:
        with open(args.input, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{args.input}: cannot read ({e})") from None
    results: dict[int, dict] = {}
    jobs = []
    for i, line in enumerate(lines):
        try:
            jobs.append((i, *_parse_line(model, line, args)))
        except ValueError as e:
            results[i] = {"index": i, "error": str(e)}
    jobs.sort(key=lambda job: len(job[1]))  # similar lengths batch together
    with tqdm(total=len(jobs), desc="generate", unit="prompt", disable=not sys.stderr.isatty()) as bar:
        for start in range(0, len(jobs), args.batch_size):
            batch = jobs[start:start + args.batch_size]
            per_row = {k: [job[2][k] for job in batch] for k in SAMPLING_FIELDS}
            outputs = generate(model, [job[1] for job in batch], **per_row)
            for (i, _, _), tokens in zip(batch, outputs):
                text = model.tokenizer.decode(tokens) if model.tokenizer is not None else None
                results[i] = {"index": i, "text": text, "tokens": tokens}
            bar.update(len(batch))
    if _is_main_process():
        body = "".join(json.dumps(results[i], ensure_ascii=False) + "\n" for i in range(len(lines)))
        _write_atomically(args.output, lambda f: f.write(body.encode("utf-8")))
    errors = [r for r in results.values() if "error" in r]
    for r in errors:
        print(f"{PROG}: error: {args.input} line {r['index'] + 1}: {r['error']}", file=sys.stderr)
    return 2 if errors else 0


def cmd_chat(args) -> int:
    model = load_model(args)
    if model.tokenizer is None:
        raise UsageError("chat needs a tokenizer; this checkpoint has none")
    messages: list[dict] = []
    print("chat with the model; an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        ids = model.tokenizer.encode_chat(messages)
        room = model.config.max_seq_len - len(ids)
        if room < 1:
            raise UsageError(f"the conversation no longer fits the context ({model.config.max_seq_len} tokens)")
        sampling = dict(_sampling(args), max_new_tokens=min(args.max_new_tokens, room))
        reply = _stream_text(model, ids, sampling)
        messages.append({"role": "assistant", "content": model.tokenizer.decode(reply) or " "})
    return 0


def cmd_score(args) -> int:
    from mixtral_jax.scoring import score_text

    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{args.file}: cannot read ({e})") from None
    if not text:
        raise UsageError(f"{args.file}: empty file")
    result = score_text(load_model(args), text)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.file}: {result['tokens']} tokens, mean NLL {result['nll']:.4f} nats, "
              f"perplexity {result['perplexity']:.3f}")
    return 0


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
        config = mj.MixtralConfig.from_dict(_read_json_file(args.config))
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
                        keep=args.keep, domain_weights=weights)
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
    build_corpus(corpus_dir, tokenizer=tok, packages=packages, max_package_tokens=args.max_package_tokens)
    result = tr.train(config, tc, out, load_corpus(corpus_dir), mesh=mesh)
    model_dir = os.path.join(out, "model")
    if not os.path.exists(model_dir):
        save(model_dir, config, result["state"].params, dtype=args.export_dtype, tokenizer=tok.path)
    last = result["history"][-1] if result["history"] else {}
    print(json.dumps({"steps": int(result["state"].step), "loss": last.get("loss"),
                      "eval": result["eval"], "model": model_dir}))
    return 0


def _read_json_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: cannot read JSON ({e})") from None


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
    p = plan_memory(config, sizes, dtype=args.dtype, batch=args.batch, max_seq_len=args.max_seq_len,
                    prompt_len=args.prompt_len, quantize=args.quantize)
    result = {"mesh": sizes, "devices": sizes["data"] * sizes["expert"] * sizes["tensor"], "dtype": args.dtype,
              "quantize": args.quantize,
              "batch": args.batch, "max_seq_len": args.max_seq_len or config.max_seq_len,
              "per_device_bytes": p, "device_memory": device_memory,
              "fits": None if device_memory is None else p["total"] <= device_memory}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    gb = lambda n: f"{n / 1e9:8.2f} GB"  # noqa: E731
    mesh_text = ",".join(f"{k}={v}" for k, v in sizes.items())
    quant = " with int8 experts and attention" if args.quantize else ""
    print(f"per-device memory, {args.dtype}{quant}, mesh {mesh_text} ({result['devices']} devices), batch "
          f"{args.batch}, KV cache {result['max_seq_len']} tokens per row:")
    for group, n in p["weights"].items():
        print(f"  weights: {group:<14}{gb(n)}")
    print(f"  weights total         {gb(p['weights_total'])}")
    print(f"  KV cache              {gb(p['kv_cache'])}")
    print(f"  activations (peak)    {gb(p['activations'])}")
    print(f"  total                 {gb(p['total'])}")
    if device_memory is not None:
        verdict = "fits" if result["fits"] else "does NOT fit"
        print(f"{verdict} in {device_memory / 1e9:.2f} GB per device")
    return 0


def cmd_bench(args) -> int:
    from mixtral_jax import bench

    if args.runs < 1:
        raise UsageError(f"--runs must be >= 1, got {args.runs}")
    report = bench.run(args.config, runs=args.runs, with_hf=not args.no_hf)
    print(json.dumps(report, indent=2) if args.json else bench.format_report(report))
    return 0


def _add_model_args(p) -> None:
    p.add_argument("--checkpoint", help="orbax checkpoint, HF folder or Mistral folder "
                                        "(default: the built-in demo model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")
    p.add_argument("--mesh", help="shard over a device mesh, e.g. data=2,expert=4,tensor=1 "
                                  "(default: one device)")
    p.add_argument("--coordinator", help="multi-host: host:port of process 0 (jax.distributed); "
                                         "default $JAX_COORDINATOR_ADDRESS")
    p.add_argument("--num-processes", type=int, help="multi-host: process count (default $JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, help="multi-host: this process (default $JAX_PROCESS_ID)")


def init_distributed(args) -> None:
    """Join a multi-process run when asked (flags or JAX's environment variables); afterwards only
    process 0 prints results."""
    coordinator = getattr(args, "coordinator", None) or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not coordinator:
        return
    import jax

    def number(flag, env):
        value = getattr(args, flag) if getattr(args, flag) is not None else os.environ.get(env)
        if value is None:
            raise UsageError(f"--{flag.replace('_', '-')} (or ${env}) is needed with --coordinator")
        return int(value)

    jax.distributed.initialize(coordinator, num_processes=number("num_processes", "JAX_NUM_PROCESSES"),
                               process_id=number("process_id", "JAX_PROCESS_ID"))
    if jax.process_index() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process


def _add_sampling_args(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 disables")
    p.add_argument("--top-p", type=float, default=1.0, help="1 disables")
    p.add_argument("--min-p", type=float, default=0.0, help="0 disables")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Mixtral sparse mixture-of-experts in JAX.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

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

    exp = sub.add_parser("export", help="orbax checkpoint -> HF or Mistral folder")
    exp.add_argument("ckpt")
    exp.add_argument("out", help="new folder (must not exist)")
    exp.add_argument("--format", choices=["hf", "mistral"], required=True)
    exp.set_defaults(func=cmd_export)

    inf = sub.add_parser("info", help="config, parameter count, dtype, size and format of a checkpoint")
    inf.add_argument("path")
    inf.add_argument("--json", action="store_true")
    inf.set_defaults(func=cmd_info)

    gen = sub.add_parser("generate", help="continue a prompt, or a JSONL file of prompts")
    _add_model_args(gen)
    gen.add_argument("--prompt", help="text to continue (BOS is added)")
    gen.add_argument("--input", help='JSONL: {"prompt": str} or {"tokens": [int]} per line, '
                                     "with optional per-line sampling fields")
    gen.add_argument("--output", help='JSONL results in input order: {"index", "text", "tokens"} or '
                                      '{"index", "error"}')
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn ([INST] format)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    gen.add_argument("--batch-size", type=int, default=8, help="prompts per batch with --input")
    _add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive multi-turn chat ([INST] format), streaming")
    _add_model_args(chat)
    _add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    plan = sub.add_parser("plan", help="per-device memory of a model on a mesh (nothing is allocated)")
    plan.add_argument("--preset", help="mixtral-8x7b, mixtral-8x22b, small or tiny")
    plan.add_argument("--checkpoint", help="plan for a checkpoint's config instead of a preset")
    plan.add_argument("--mesh", default="data=1,expert=1,tensor=1", help="e.g. data=1,expert=8,tensor=1")
    plan.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    plan.add_argument("--batch", type=int, default=1)
    plan.add_argument("--max-seq-len", type=int, help="KV cache tokens per row (default: the context)")
    plan.add_argument("--prompt-len", type=int, default=512, help="prefill length for the activation estimate")
    plan.add_argument("--device-memory", help="e.g. 16GB: say whether the plan fits")
    plan.add_argument("--quantize", choices=["int8"], help="int8 expert and attention weights")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=cmd_plan)

    bench = sub.add_parser("bench", help="side-by-side speed against HF transformers (float32, CPU)")
    bench.add_argument("--config", choices=["small", "tiny"], default="small")
    bench.add_argument("--runs", type=int, default=5, help="timed runs per figure (median)")
    bench.add_argument("--no-hf", action="store_true", help="skip the HF transformers side")
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=cmd_bench)

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
    tr.add_argument("--mesh", help="e.g. data=2 (data parallel over host devices)")
    tr.add_argument("--domain-weights", default="0.6,0.25,0.15",
                    help="share of training rows drawn from code,prose,math")
    tr.add_argument("--corpus-packages", help="comma-separated installed packages whose Python sources "
                                              "add training code and prose (TRAINING.md)")
    tr.add_argument("--max-package-tokens", type=int, help="code tokens taken per package at most")
    tr.add_argument("--export-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="dtype of OUT/model")
    tr.set_defaults(func=cmd_train)

    rt = sub.add_parser("routing", help="routing analysis of files (a domain each): shares, "
                                        "consecutive-token rates, entropy, co-activation")
    _add_model_args(rt)
    rt.add_argument("files", nargs="+", help="text files, one domain each (labelled by file name)")
    rt.add_argument("--labels", help="comma-separated domain label per file (default: file names)")
    rt.add_argument("--layers", default="0,mid,last", help="layers to analyse: integers, mid, last")
    rt.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    rt.add_argument("--html", help="write a page colouring each token by its first-choice expert")
    rt.add_argument("--plot", help="write a PNG of the shares and consecutive-token rates")
    _add_intervention_args(rt)
    rt.set_defaults(func=cmd_routing)

    score = sub.add_parser("score", help="tokens, mean NLL and perplexity of a text file")
    _add_model_args(score)
    _add_intervention_args(score)
    score.add_argument("file")
    score.add_argument("--json", action="store_true", help='print {"tokens", "nll", "perplexity"}')
    score.set_defaults(func=cmd_score)
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        init_distributed(args)
        return args.func(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:  # bad input files or values
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line, not a traceback; MIXTRAL_JAX_DEBUG=1 for it
        if os.environ.get("MIXTRAL_JAX_DEBUG"):
            raise
        print(f"{PROG}: internal error: {type(e).__name__}: {e} (set MIXTRAL_JAX_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
