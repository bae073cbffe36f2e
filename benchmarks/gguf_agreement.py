"""Does llama.cpp run our GGUF export the way we run the checkpoint? Greedy continuations compared.

Exports a checkpoint (default: the demo model) with `mixtral-jax export --format gguf`, runs
llama.cpp's `llama-simple` on it (greedy; build it from the llama.cpp source vendored in the
`llama-cpp-python` sdist, BENCHMARKS.md says how), and compares its continuation with
`mixtral_jax.generate`'s greedy one (no penalties) for the same prompt, as text decoded in context.

    python benchmarks/gguf_agreement.py --llama-simple PATH/llama-simple [--gguf-type f32] [--tokens 32]

Not part of the test suite: it needs a llama.cpp build.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

PROMPTS = ("def fibonacci(n):", "import numpy as np\n\ndef", "The capital of France is")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-simple", required=True, help="llama.cpp's llama-simple binary")
    parser.add_argument("--checkpoint", help="a mixtral_jax checkpoint (default: the demo model)")
    parser.add_argument("--gguf-type", default="f32", choices=["f32", "f16", "q8_0"])
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()

    import mixtral_jax as mj
    from mixtral_convert.gguf_export import export_gguf
    from mixtral_jax.checkpoint import demo_model_path
    from mixtral_jax.detokenize import text_in_context

    ckpt = args.checkpoint or demo_model_path()
    model = mj.load(ckpt)
    agree = 0
    with tempfile.TemporaryDirectory(prefix="gguf-agreement-") as tmp:
        out = os.path.join(tmp, "model.gguf")
        summary = export_gguf(ckpt, out, gguf_type=args.gguf_type)
        print(f"exported {ckpt} -> {args.gguf_type} GGUF, {summary['bytes'] / 1e6:.1f} MB")
        for prompt in PROMPTS:
            ids = model.tokenizer.encode(prompt)
            new = mj.generate(model, [ids], max_new_tokens=args.tokens, stop_tokens=[model.tokenizer.eos_id])[0]
            ours = text_in_context(model.tokenizer, ids, list(new))
            run = subprocess.run([args.llama_simple, "-m", out, "-n", str(args.tokens), prompt],
                                 capture_output=True, text=True, timeout=600)
            if run.returncode != 0:
                print(f"llama-simple failed ({run.returncode}): {run.stderr[-2000:]}", file=sys.stderr)
                return 1
            theirs = run.stdout.rstrip("\n")
            same = theirs.endswith(ours) and prompt in theirs
            agree += same
            print(f"{'SAME' if same else 'DIFFERENT'} {prompt!r}\n  mixtral_jax: {ours!r}\n  llama.cpp:   {theirs!r}")
    print(f"{agree}/{len(PROMPTS)} prompts: llama.cpp's greedy {args.tokens}-token continuation equals ours")
    return 0 if agree == len(PROMPTS) else 1


if __name__ == "__main__":
    sys.exit(main())
