"""The `mixtral-jax` command line.

Exit codes: 0 success, 2 usage or input errors (one line on stderr, no traceback), 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
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
    from mixtral_convert import write_hf

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
    with tempfile.TemporaryDirectory(prefix="mixtral-jax-demo-") as folder:
        write_hf(folder, config, params)
        shutil.copy(tok.path, os.path.join(folder, "tokenizer.model"))
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Mixtral sparse mixture-of-experts in JAX.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="run the pipeline end to end on a small random model")
    demo.add_argument("--prompt", default="def fibonacci(n):")
    demo.add_argument("--max-new-tokens", type=int, default=16)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
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
