"""Compiled temp memory of a training step's value-and-grad under each remat policy.

XLA's own `memory_analysis()` of the compiled program (nothing is run), on `small`-width layers
(d_model 256, d_ff 896, 8 experts, 8 heads) at 4 rows x 512 tokens, 4 layers. Usage:
python benchmarks/train_memory.py [--layers 4] [--batch 4] [--seq-len 512] [--vocab 32000]
"""

import argparse
import json

import jax
import jax.numpy as jnp

import mixtral_jax as mj
from mixtral_jax import train as tr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary (its logits are not rematerialised)")
    args = ap.parse_args()
    config = mj.MixtralConfig(vocab_size=args.vocab, d_model=256, n_layers=args.layers, n_heads=8, n_kv_heads=2,
                              head_dim=32, d_ff=896, n_experts=8, top_k=2, max_seq_len=args.seq_len + 1)
    params = jax.eval_shape(lambda: mj.init_params(config))
    tokens = jax.ShapeDtypeStruct((args.batch, args.seq_len + 1), jnp.int32)
    lengths = jax.ShapeDtypeStruct((args.batch,), jnp.int32)
    out = {}
    for remat in ("none", "layer", "dots"):
        tc = tr.TrainConfig(remat=remat, seq_len=args.seq_len, batch_size=args.batch)
        fn = jax.jit(jax.value_and_grad(lambda p, t, n, tc=tc: tr.loss_fn(p, config, tc, t, n)[0]))
        out[remat] = fn.lower(params, tokens, lengths).compile().memory_analysis().temp_size_in_bytes
    print(json.dumps({"config": {"layers": args.layers, "batch": args.batch, "seq_len": args.seq_len, "vocab": args.vocab},
                      "temp_bytes": out, "ratio_to_none": {k: v / out["none"] for k, v in out.items()}}))


if __name__ == "__main__":
    main()
