"""Text commands: `generate` (a prompt, or a JSONL file of prompts), `chat` and `score`.

Sampling settings resolve in three layers: an explicit flag (or a JSONL field) wins over the
checkpoint's `generation_config.json`, which wins over the built-in defaults (greedy, 128 new tokens,
no filters, no penalties).
"""

from __future__ import annotations

import json
import os
import sys

from .common import (PROG, UsageError, add_intervention_args, add_model_args, is_main_process, load_model,
                     read_text_file, write_atomically)

DEFAULTS = {"max_new_tokens": 128, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
            "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "seed": 0}
SAMPLING_FIELDS = tuple(DEFAULTS)  # also the per-line fields of a JSONL input
_DIM, _RESET = "\x1b[2m", "\x1b[0m"


def resolve_sampling(args, model) -> dict:
    """Flags over the checkpoint's generation defaults over DEFAULTS (may add `stop_tokens`), plus
    how to run: attention, prefill chunk, KV cache dtype."""
    out = {**DEFAULTS, **model.generation_config_kwargs()}
    out.update({k: getattr(args, k) for k in SAMPLING_FIELDS if getattr(args, k, None) is not None})
    return out | running(args)


def running(args) -> dict:
    """The generate keyword arguments that choose how (not what) to compute."""
    out = {"attention": args.attention, "kv_dtype": args.kv_dtype}
    if args.prefill_chunk is not None:
        if args.prefill_chunk < 0:
            raise UsageError(f"--prefill-chunk must be >= 0 (0: the whole prompt at once), got {args.prefill_chunk}")
        out["prefill_chunk"] = args.prefill_chunk
    return out


def _prompt_ids(model, text: str, chat: bool) -> list[int]:
    if model.tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer; give token ids instead of text")
    if chat:
        return model.tokenizer.encode_chat([{"role": "user", "content": text}])
    return model.tokenizer.encode(text, bos=True)


def _dim(text: str, out) -> str:
    """`text` dimmed when `out` is a terminal that takes colours (NO_COLOR unset)."""
    if text and out.isatty() and not os.environ.get("NO_COLOR"):
        return _DIM + text + _RESET
    return text


def stream_text(model, ids: list[int], sampling: dict, context: list[int], out=None) -> list[int]:
    """Print one row's new text, decoded after `context`, as it is generated; returns its tokens."""
    from mixtral_jax import generate_stream
    from mixtral_jax.detokenize import IncrementalText

    out = out or sys.stdout
    text = IncrementalText(model.tokenizer, context)
    new: list[int] = []
    for step in generate_stream(model, [ids], **sampling):
        if step[0] is None:
            break
        new.append(step[0])
        out.write(text.add(step[0]))
        out.flush()
    out.write(text.flush() + "\n")
    out.flush()
    return new


def _finish_reason(new: list[int], sampling: dict, model) -> str:
    from mixtral_jax.sampler import DEFAULT_EOS

    stop = sampling.get("stop_tokens")
    if stop is None:
        stop = [model.tokenizer.eos_id if model.tokenizer is not None else DEFAULT_EOS]
    return "stop" if new and new[-1] in stop else "length"


def cmd_generate(args) -> int:
    from mixtral_jax import generate
    from mixtral_jax.detokenize import text_in_context

    if (args.prompt is None) == (args.input is None):
        raise UsageError("give either --prompt TEXT or --input FILE --output FILE")
    if (args.input is None) != (args.output is None):
        raise UsageError("--input and --output go together")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.json and args.stream:
        raise UsageError("--json prints one object at the end; it does not go with --stream")
    model = load_model(args)
    if args.input is not None:
        return _generate_file(model, args)
    ids = _prompt_ids(model, args.prompt, args.chat)
    sampling = resolve_sampling(args, model)
    tok = model.tokenizer
    # Chat replies and --no-echo print the continuation alone, decoded on its own (round 1's output).
    echo = not (args.chat or args.no_echo or args.json)
    if args.stream:
        if echo:
            sys.stdout.write(_dim(tok.decode(ids), sys.stdout))
        stream_text(model, ids, sampling, ids if echo else [])
        return 0
    new = generate(model, [ids], **sampling)[0]
    if args.json:
        text = tok.decode(new) if args.chat else text_in_context(tok, ids, new)
        print(json.dumps({"prompt": args.prompt, "text": text, "tokens": new,
                          "finish_reason": _finish_reason(new, sampling, model)}, ensure_ascii=False))
    elif echo:
        head, full = tok.decode(ids), tok.decode(ids + new)
        print(_dim(head, sys.stdout) + full[len(head):] if full.startswith(head) else full)
    else:
        print(tok.decode(new))
    return 0


def _parse_line(model, line: str, base: dict, chat: bool) -> tuple[list[int], dict]:
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
        ids = _prompt_ids(model, rec["prompt"], chat)
    else:
        ids = rec["tokens"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError('"tokens" must be a list of integers')
    sampling = {**base, **{k: rec[k] for k in SAMPLING_FIELDS if k in rec}}
    for k in SAMPLING_FIELDS:
        if isinstance(sampling[k], bool) or not isinstance(sampling[k], (int, float)):
            raise ValueError(f"{k} must be a number")
    prepare(model, [ids], **sampling)  # the same host-side checks as generate
    return ids, sampling


def _generate_file(model, args) -> int:
    from tqdm import tqdm

    from mixtral_jax import generate

    try:
        with open(args.input, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{args.input}: cannot read ({e})") from None
    base = resolve_sampling(args, model)
    results: dict[int, dict] = {}
    jobs = []
    for i, line in enumerate(lines):
        try:
            jobs.append((i, *_parse_line(model, line, base, args.chat)))
        except ValueError as e:
            results[i] = {"index": i, "error": str(e)}
    jobs.sort(key=lambda job: len(job[1]))  # similar lengths batch together
    shared = {k: base[k] for k in base if k not in SAMPLING_FIELDS}  # stop tokens, how to run
    with tqdm(total=len(jobs), desc="generate", unit="prompt", disable=not sys.stderr.isatty()) as bar:
        for start in range(0, len(jobs), args.batch_size):
            batch = jobs[start:start + args.batch_size]
            per_row = {k: [job[2][k] for job in batch] for k in SAMPLING_FIELDS}
            outputs = generate(model, [job[1] for job in batch], **per_row, **shared)
            for (i, _, _), tokens in zip(batch, outputs):
                text = model.tokenizer.decode(tokens) if model.tokenizer is not None else None
                results[i] = {"index": i, "text": text, "tokens": tokens}
            bar.update(len(batch))
    if is_main_process():
        body = "".join(json.dumps(results[i], ensure_ascii=False) + "\n" for i in range(len(lines)))
        write_atomically(args.output, lambda f: f.write(body.encode("utf-8")))
    errors = [r for r in results.values() if "error" in r]
    for r in errors:
        print(f"{PROG}: error: {args.input} line {r['index'] + 1}: {r['error']}", file=sys.stderr)
    return 2 if errors else 0


def cmd_chat(args) -> int:
    model = load_model(args)
    if model.tokenizer is None:
        raise UsageError("chat needs a tokenizer; this checkpoint has none")
    base = resolve_sampling(args, model)
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
        reply = stream_text(model, ids, dict(base, max_new_tokens=min(base["max_new_tokens"], room)), [])
        messages.append({"role": "assistant", "content": model.tokenizer.decode(reply) or " "})
    return 0


def cmd_score(args) -> int:
    from mixtral_jax.scoring import score_text

    text = read_text_file(args.file)
    if not text:
        raise UsageError(f"{args.file}: empty file")
    if args.context_lengths:
        from .evals import score_by_context

        return score_by_context(args, text)
    result = score_text(load_model(args), text)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.file}: {result['tokens']} tokens, mean NLL {result['nll']:.4f} nats, "
              f"perplexity {result['perplexity']:.3f}")
    return 0


def _add_sampling_args(p) -> None:
    note = " (default: the checkpoint's generation_config.json, else %s)"
    p.add_argument("--max-new-tokens", type=int, help="tokens to generate" + note % 128)
    p.add_argument("--temperature", type=float, help="0 is greedy" + note % "0, greedy")
    p.add_argument("--top-k", type=int, help="0 disables" + note % 0)
    p.add_argument("--top-p", type=float, help="1 disables" + note % 1)
    p.add_argument("--min-p", type=float, help="0 disables" + note % 0)
    p.add_argument("--repetition-penalty", type=float,
                   help="HF's: divide (multiply if negative) the logits of tokens already in the prompt "
                        "or output; 1 disables" + note % 1)
    p.add_argument("--presence-penalty", type=float,
                   help="OpenAI's: subtract from generated tokens' logits, in [-2, 2]" + note % 0)
    p.add_argument("--frequency-penalty", type=float,
                   help="OpenAI's: subtract times each generated token's count, in [-2, 2]" + note % 0)
    p.add_argument("--seed", type=int, help="sampling seed (default 0)")


def _add_running_args(p) -> None:
    from mixtral_jax.attention import IMPLEMENTATIONS
    from mixtral_jax.kvcache import DTYPES
    from mixtral_jax.sampler import DEFAULT_PREFILL_CHUNK

    p.add_argument("--attention", choices=IMPLEMENTATIONS, default="auto",
                   help="attention implementation (default auto: by platform; README, long context)")
    p.add_argument("--prefill-chunk", type=int,
                   help=f"prompt tokens per prefill step (default {DEFAULT_PREFILL_CHUNK}; 0: all at once)")
    p.add_argument("--kv-dtype", choices=DTYPES, help="KV cache dtype; int8 halves a bfloat16 cache "
                                                      "(default: the model's dtype)")


def add_parsers(sub) -> None:
    gen = sub.add_parser("generate", help="continue a prompt, or a JSONL file of prompts")
    add_model_args(gen)
    gen.add_argument("--prompt", help="text to continue (BOS is added); prints the prompt and its continuation")
    gen.add_argument("--input", help='JSONL: {"prompt": str} or {"tokens": [int]} per line, '
                                     "with optional per-line sampling fields")
    gen.add_argument("--output", help='JSONL results in input order: {"index", "text", "tokens"} or '
                                      '{"index", "error"}')
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn ([INST] format); "
                                                         "prints the reply only")
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    gen.add_argument("--no-echo", action="store_true", help="print the continuation only, not the prompt")
    gen.add_argument("--json", action="store_true",
                     help='print {"prompt", "text" (new text), "tokens" (new ids), "finish_reason"}')
    gen.add_argument("--batch-size", type=int, default=8, help="prompts per batch with --input")
    _add_sampling_args(gen)
    _add_running_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive multi-turn chat ([INST] format), streaming")
    add_model_args(chat)
    _add_sampling_args(chat)
    _add_running_args(chat)
    chat.set_defaults(func=cmd_chat)

    score = sub.add_parser("score", help="tokens, mean NLL and perplexity of a text file")
    add_model_args(score)
    add_intervention_args(score)
    score.add_argument("file")
    score.add_argument("--json", action="store_true", help='print {"tokens", "nll", "perplexity"} (with '
                       '--context-lengths: {"context_lengths", "perplexity", "tokens"})')
    score.add_argument("--context-lengths", help="perplexity of the same tokens with each of these many tokens "
                                                 "of context, e.g. 128,256,512 (the paper's Figure 4)")
    score.add_argument("--plot", help="with --context-lengths: write a PNG of perplexity against context")
    score.set_defaults(func=cmd_score)
