"""Does the built-in demo model write plausible Python? 20 prompts, 64 new tokens each, checked by a parser.

Each prompt starts a Python definition or statement. The model continues it with the checkpoint's
generation defaults (`generation_config.json`; with sampling, prompt i uses seed i). A
continuation passes when all of these hold:

- the prompt plus the continuation's complete lines (up to its last newline) parses with
  `ast.parse`, after closing a block left open by the last line (one ending in ":") with an
  indented `pass`;
- no line appears more than 3 times in a row;
- no run of more than 40 spaces.

Usage:
    python benchmarks/demo_quality.py [--checkpoint PATH] [--json] [--show]
    python benchmarks/demo_quality.py --sweep        # candidate defaults side by side (TRAINING.md)

Exits 1 when fewer than `--min-pass` (default 12) of the 20 pass.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import re
import sys

PROMPTS = [
    "def fibonacci(n):",
    "import os",
    "class Stack:",
    "for i in range(10):",
    'if __name__ == "__main__":',
    "def read_file(path):",
    "import sys\n\n\ndef main():",
    "class Config(object):",
    "from collections import defaultdict",
    "def is_prime(n):",
    "with open(filename) as f:",
    "while True:",
    "def parse_args(argv=None):",
    "class Node:\n    def __init__(self, value):",
    "try:",
    "def __repr__(self):",
    "import json",
    "def merge_sort(items):",
    "@property\ndef name(self):",
    "for line in sys.stdin:",
]
NEW_TOKENS = 64
MIN_PASS = 12
MAX_REPEATS = 3
MAX_SPACES = 40


def complete_source(prompt: str, continuation: str) -> str:
    """The prompt plus the continuation's complete lines, an open block closed with `pass`."""
    text = prompt + continuation
    cut = text.rfind("\n")
    lines = (text[:cut] if cut >= len(prompt) else prompt).split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    last = lines[-1] if lines else ""
    if last.rstrip().endswith(":"):
        indent = len(last) - len(last.lstrip())
        lines.append(" " * (indent + 4) + "pass")
    return "\n".join(lines) + "\n"


def check(prompt: str, continuation: str) -> str | None:
    """None when the continuation passes; else the first rule it breaks."""
    if re.search(" {%d}" % (MAX_SPACES + 1), continuation):
        return f"a run of more than {MAX_SPACES} spaces"
    for line, run in itertools.groupby((prompt + continuation).split("\n")):
        if len(list(run)) > MAX_REPEATS:
            return f"line {line.strip()[:40]!r} repeated more than {MAX_REPEATS} times in a row"
    try:
        ast.parse(complete_source(prompt, continuation))
    except (SyntaxError, ValueError) as e:
        return f"does not parse: {e.msg if isinstance(e, SyntaxError) else e}"
    return None


def continuations(model, sampling: dict) -> list[str]:
    """Each prompt's continuation, decoded in context, with `sampling` (generate keyword arguments)."""
    from mixtral_jax import generate
    from mixtral_jax.detokenize import text_in_context

    tok = model.tokenizer
    prompts = [tok.encode(p, bos=True) for p in PROMPTS]
    sampling = dict(sampling, max_new_tokens=NEW_TOKENS, seed=list(range(len(PROMPTS))))
    new = generate(model, prompts, **sampling)
    return [text_in_context(tok, p, n) for p, n in zip(prompts, new)]


def evaluate(model, sampling: dict) -> list[dict]:
    """Per prompt: {"prompt", "continuation", "failure" (None when it passes)}."""
    return [{"prompt": p, "continuation": c, "failure": check(p, c)}
            for p, c in zip(PROMPTS, continuations(model, sampling))]


# Candidate defaults compared by --sweep: greedy, greedy with penalties, and sampling.
CANDIDATES = (
    [{"temperature": 0.0}]
    + [{"temperature": 0.0, "repetition_penalty": r} for r in (1.05, 1.1, 1.15, 1.2, 1.3)]
    + [{"temperature": 0.0, "frequency_penalty": f} for f in (0.2, 0.5)]
    + [{"temperature": t, "top_p": p, "repetition_penalty": r}
       for t, p, r in ((0.7, 0.9, 1.0), (0.7, 0.9, 1.1), (0.5, 0.95, 1.1), (0.9, 0.9, 1.1))]
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="default: the built-in demo model")
    parser.add_argument("--min-pass", type=int, default=MIN_PASS)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--show", action="store_true", help="print every continuation")
    parser.add_argument("--sweep", action="store_true", help="compare candidate defaults")
    args = parser.parse_args()

    import mixtral_jax as mj
    from mixtral_jax.checkpoint import demo_model_path

    model = mj.load(args.checkpoint or demo_model_path())
    if args.sweep:
        for sampling in CANDIDATES:
            passed = sum(r["failure"] is None for r in evaluate(model, sampling))
            print(f"{passed:>2}/{len(PROMPTS)}  {json.dumps(sampling)}", flush=True)
        return 0
    results = evaluate(model, model.generation_config_kwargs())
    passed = sum(r["failure"] is None for r in results)
    if args.json:
        print(json.dumps({"passed": passed, "of": len(results), "defaults": model.generation_config,
                          "results": results}, ensure_ascii=False))
    else:
        for r in results:
            status = "pass" if r["failure"] is None else f"FAIL ({r['failure']})"
            print(f"{r['prompt'].splitlines()[-1][:40]:<42}{status}")
            if args.show:
                print(r["prompt"] + r["continuation"] + "\n" + "-" * 60)
        print(f"{passed}/{len(results)} continuations pass (need {args.min_pass}); defaults "
              f"{json.dumps(model.generation_config)}")
    return 0 if passed >= args.min_pass else 1


if __name__ == "__main__":
    sys.exit(main())
