"""int8 weight-only quantization against float32 on the built-in (trained) demo model.

Prints the share of free-running greedy tokens that match (10 prompts x 32 new tokens; the int8
model both batched and one prompt at a time, since batch-1 decode takes its own int8 path on AVX2,
mixtral_jax/kernels) and, on ordinary Python (notebooks/data/code.py, first 512 tokens), the
per-token KL(float32 || int8) and the argmax agreement given the same prefix.

    python benchmarks/int8_agreement.py
"""

import os

import jax
import jax.numpy as jnp

import mixtral_jax as mj
from mixtral_jax.checkpoint import demo_model_path

PROMPTS = ["def fibonacci(n):", "import os\n\ndef main():", "The function returns", "x = 3 + 4 * 2\nprint(",
           "class Stack:\n    def __init__(self):", "for i in range(10):", "# Compute the mean of a list\n",
           "Return the number of", "12 + 35 =", "def read_file(path):"]
TEXT = os.path.join(os.path.dirname(__file__), "..", "notebooks", "data", "code.py")


def main():
    full = mj.load(demo_model_path())
    quant = mj.load(demo_model_path(), quantize="int8")
    a = mj.generate(full, PROMPTS, max_new_tokens=32, stop_tokens=[])
    batched = mj.generate(quant, PROMPTS, max_new_tokens=32, stop_tokens=[])
    alone = [mj.generate(quant, [p], max_new_tokens=32, stop_tokens=[])[0] for p in PROMPTS]
    for name, b in (("batched", batched), ("one prompt at a time", alone)):
        same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
        prefix = [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), len(ra)) for ra, rb in zip(a, b)]
        print(f"free-running greedy, int8 {name}: {same}/{sum(map(len, a))} tokens equal position by position; "
              f"tokens before the first difference per prompt: {prefix}")
    with open(TEXT) as f:
        ids = jnp.asarray([full.tokenizer.encode(f.read())[:512]])
    log_full = jax.nn.log_softmax(full(ids), axis=-1)
    log_quant = jax.nn.log_softmax(quant(ids), axis=-1)
    kl = jnp.sum(jnp.exp(log_full) * (log_full - log_quant), axis=-1)
    agree = jnp.mean(jnp.argmax(log_full, -1) == jnp.argmax(log_quant, -1))
    print(f"same prefix, {ids.shape[1]} tokens of notebooks/data/code.py: KL mean {float(kl.mean()):.2e}, "
          f"max {float(kl.max()):.2e}; argmax agreement {float(agree):.3f}")


if __name__ == "__main__":
    main()
