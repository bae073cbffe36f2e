"""The long-context evaluations (the Mixtral paper's §3.2; mixtral_jax.evals): `passkey`, and
`score --context-lengths` (its parser lives with `score`)."""

from __future__ import annotations

import json
import sys

from .common import UsageError, add_model_args, load_model, write_atomically
from .generate import _add_running_args, running


def _numbers(text: str, kind, flag: str) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise UsageError(f"{flag}: no values given")
    return values


def parse_context_lengths(text: str) -> list[int]:
    lengths = _numbers(text, int, "--context-lengths")
    if min(lengths) < 1:
        raise UsageError(f"--context-lengths must be >= 1, got {text!r}")
    return lengths


def cmd_passkey(args) -> int:
    from mixtral_jax import evals

    lengths = _numbers(args.lengths, int, "--lengths")
    depths = _numbers(args.depths, float, "--depths")
    if any(not 0 <= d <= 1 for d in depths):
        raise UsageError(f"--depths must lie in [0, 1], got {args.depths!r}")
    if args.trials < 1:
        raise UsageError(f"--trials must be >= 1, got {args.trials}")
    model = load_model(args)
    limit = model.config.max_seq_len - evals.ANSWER_TOKENS
    if max(lengths) > limit or min(lengths) < 1:
        raise UsageError(f"--lengths must lie in [1, {limit}] (the context, {model.config.max_seq_len}, "
                         f"minus {evals.ANSWER_TOKENS} answer tokens), got {args.lengths!r}")
    if model.tokenizer is None:
        raise UsageError("passkey needs a tokenizer; this checkpoint has none")
    with _progress(len(lengths) * len(depths) * args.trials, "passkey", "prompt") as bar:
        result = evals.passkey(model, lengths, depths, trials=args.trials, seed=args.seed, progress=bar.update,
                               **running(args))

    def table():
        print(f"passkey retrieval accuracy, {args.trials} keys per cell (rows: length in tokens, columns: depth)")
        print(f"{'length':>8} " + " ".join(f"{d:>6g}" for d in depths))
        for n, row in zip(lengths, result["accuracy"]):
            print(f"{n:>8} " + " ".join(f"{a:>6.0%}" for a in row))

    return _emit(args, result, evals.plot_passkey, table)


def score_by_context(args, text: str) -> int:
    """score --context-lengths: perplexity of the same tokens as the context grows."""
    from mixtral_jax import evals
    from mixtral_jax.scoring import tokenizer_for

    lengths = parse_context_lengths(args.context_lengths)
    model = load_model(args)
    ids = tokenizer_for(model).encode(text, bos=True)
    if len(ids) <= max(lengths):
        raise UsageError(f"{args.file}: {len(ids)} tokens; --context-lengths needs more than the largest "
                         f"({max(lengths)}) to score any token")
    with _progress((len(ids) - max(lengths)) * len(lengths), "score", "token") as bar:
        result = evals.context_perplexity(model, ids, lengths, progress=bar.update)

    def table():
        print(f"{args.file}: the last {result['tokens']} tokens, each with c tokens of context:")
        for c, p in zip(lengths, result["perplexity"]):
            print(f"  c = {c:>6}: perplexity {p:.3f}")

    return _emit(args, result, evals.plot_context, table)


def _progress(total: int, desc: str, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not sys.stderr.isatty())


def _emit(args, result: dict, plot, table) -> int:
    """The PNG (--plot), then the JSON (--json) or the table on stdout."""
    if args.plot:
        write_atomically(args.plot, lambda f: plot(result, f))
    if args.json:
        print(json.dumps(result))
    else:
        table()
    return 0


def add_parsers(sub) -> None:
    pk = sub.add_parser("passkey", help="passkey retrieval accuracy by prompt length and key depth")
    add_model_args(pk)
    pk.add_argument("--lengths", required=True, help="prompt lengths in tokens, e.g. 1024,2048,4096")
    pk.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="key depths in [0, 1] (default 0,0.25,0.5,0.75,1)")
    pk.add_argument("--trials", type=int, default=5, help="keys per length and depth (default 5)")
    pk.add_argument("--seed", type=int, default=0, help="seed of the keys")
    pk.add_argument("--json", action="store_true",
                    help='print {"lengths", "depths", "trials", "accuracy": [[per depth] per length]}')
    pk.add_argument("--plot", help="write a PNG heatmap of the accuracy")
    _add_running_args(pk)
    pk.set_defaults(func=cmd_passkey)
