"""`passkey`: the passkey retrieval evaluation (the Mixtral paper's §3.2; mixtral_jax.evals)."""

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
    from tqdm import tqdm

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
    total = len(lengths) * len(depths) * args.trials
    with tqdm(total=total, desc="passkey", unit="prompt", disable=not sys.stderr.isatty()) as bar:
        result = evals.passkey(model, lengths, depths, trials=args.trials, seed=args.seed, progress=bar.update,
                               **running(args))
    if args.plot:
        write_atomically(args.plot, lambda f: evals.plot_passkey(result, f))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"passkey retrieval accuracy, {args.trials} keys per cell (rows: length in tokens, columns: depth)")
    print(f"{'length':>8} " + " ".join(f"{d:>6g}" for d in depths))
    for n, row in zip(lengths, result["accuracy"]):
        print(f"{n:>8} " + " ".join(f"{a:>6.0%}" for a in row))
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
