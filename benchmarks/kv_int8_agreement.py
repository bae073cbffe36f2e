"""The int8 KV cache against a float cache: teacher-forced argmax agreement and per-token KL.

Each of the 20 demo_quality prompts is continued greedily for 64 tokens with a float cache
(`stop_tokens=[]`); the prompt and its continuation are then run through the model once with a float
cache and once with an int8 cache, and the next-token distributions at the 64 generated positions
are compared: argmax agreement, KL(float || int8) mean and max. On the built-in demo model and on
a random `small`-config model (float32 weights, N(0, 0.02) as HF initialises).

    python benchmarks/kv_int8_agreement.py [--json] [--skip-small]
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from demo_quality import PROMPTS  # noqa: E402

NEW_TOKENS = 64


def teacher_forced(model, prompts=PROMPTS, new_tokens=NEW_TOKENS) -> dict:
    """Agreement and KL of the int8 cache against the float cache at every generated position."""
    import mixtral_jax as mj

    tok = model.tokenizer
    ids = [tok.encode(p, bos=True) if isinstance(p, str) else list(p) for p in prompts]
    greedy = mj.generate(model, ids, max_new_tokens=new_tokens, stop_tokens=[])
    seqs = [p + g[:-1] for p, g in zip(ids, greedy)]
    lengths = np.array([len(s) for s in seqs])
    tokens = np.zeros((len(seqs), lengths.max()), np.int32)
    for b, s in enumerate(seqs):
        tokens[b, :len(s)] = s
    logp = {}
    for kv in ("float32", "int8"):
        cache = mj.init_cache(model.config, len(seqs), int(lengths.max()), dtype=kv)
        logits, _ = mj.forward(model.config, model.params, tokens, lengths=lengths, cache=cache)
        logp[kv] = jax.nn.log_softmax(logits, axis=-1)
    rows = jnp.arange(len(seqs))[:, None]
    at = jnp.asarray([[len(p) - 1 + i for i in range(new_tokens)] for p in ids])     # [B, new]
    f, q = logp["float32"][rows, at], logp["int8"][rows, at]                          # [B, new, V]
    kl = jnp.sum(jnp.exp(f) * (f - q), axis=-1)
    return {"positions": int(at.size), "argmax_agreement": float(jnp.mean(f.argmax(-1) == q.argmax(-1))),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--skip-small", action="store_true", help="the demo model only")
    args = parser.parse_args()

    import mixtral_jax as mj
    from mixtral_jax.checkpoint import demo_model_path

    results = {"demo": teacher_forced(mj.load(demo_model_path()))}
    if not args.skip_small:
        config = mj.MixtralConfig.small()
        rng = np.random.default_rng(0)
        small = mj.Model(config, mj.init_params(config, seed=0), mj.Tokenizer())
        prompts = [rng.integers(3, config.vocab_size, len(mj.Tokenizer().encode(p))).tolist() for p in PROMPTS]
        results["small_random"] = teacher_forced(small, prompts)
    if args.json:
        print(json.dumps(results))
        return
    for name, r in results.items():
        print(f"{name}: {r['positions']} teacher-forced positions, argmax agreement {r['argmax_agreement']:.4f}, "
              f"KL(float || int8) mean {r['kl_mean']:.2e}, max {r['kl_max']:.2e}")


if __name__ == "__main__":
    main()
