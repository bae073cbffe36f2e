"""Host peak RSS of restoring a checkpoint onto 8 host devices with the experts split.

Builds a ~2 GB float32 checkpoint with Mixtral's proportions (experts ~97% of the weights:
8 layers, D=512, F=5120, 8 experts, V=8000) in one child process, then restores it with
`mixtral_jax.load(path, mesh=make_mesh(...))` in another (8 devices via
XLA_FLAGS=--xla_force_host_platform_device_count=8) and prints that child's own peak RSS (wait4)
over the checkpoint's parameter bytes (parameters x 4 bytes). A replicated restore would hold
about 8 copies.

    python benchmarks/sharded_restore_memory.py [--mesh data=1,expert=8,tensor=1] [--json]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

from measure import run_measured
from mixtral_jax import MixtralConfig
from mixtral_jax.model import count_params

CONFIG = dict(vocab_size=8000, d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64, d_ff=5120)


def build(path):
    """Child: random float32 weights written as an HF folder, converted to a project checkpoint."""
    import numpy as np

    from mixtral_convert import convert, write_folder
    from mixtral_jax.model import layer_name, param_specs

    config = MixtralConfig(**CONFIG)
    specs = param_specs(config)
    rng = np.random.default_rng(0)

    def items():
        draw = lambda spec: (0.02 * rng.standard_normal(spec.shape, np.float32))  # noqa: E731
        yield "globals", {k: draw(v) for k, v in specs.items() if not k.startswith("layers_")}
        for i in range(config.n_layers):
            yield layer_name(i), {k: draw(v) for k, v in specs[layer_name(i)].items()}

    write_folder(os.path.join(path, "hf"), config, items(), "hf", np.float32)
    convert(os.path.join(path, "hf"), os.path.join(path, "ckpt"))


def restore(path, mesh_text):
    """Child: restore onto the mesh and touch every parameter."""
    import jax

    import mixtral_jax as mj
    from mixtral_jax.sharding import parse_mesh

    model = mj.load(os.path.join(path, "ckpt"), mesh=mj.make_mesh(**parse_mesh(mesh_text)))
    jax.block_until_ready(model.params)
    shard = model.params["layers_0"]["w_gate"].addressable_shards[0].data.shape
    print(json.dumps({"devices": jax.device_count(), "w_gate_shard": list(shard)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", default="data=1,expert=8,tensor=1")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("ROLE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        role, path = args.child
        return build(path) if role == "build" else restore(path, args.mesh)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, __file__, "--child", "build", tmp], check=True)
        n_bytes = 4 * count_params(MixtralConfig(**CONFIG))
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
        out, peak, _ = run_measured([sys.executable, __file__, "--mesh", args.mesh, "--child", "restore", tmp],
                                    env)
    result = {"mesh": args.mesh, "checkpoint_gb": n_bytes / 1e9, "peak_rss_gb": peak / 1e9,
              "ratio": peak / n_bytes, **json.loads(out)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"restored a {result['checkpoint_gb']:.2f} GB (float32 parameters) checkpoint onto "
              f"{result['devices']} host devices ({args.mesh}; w_gate shard {result['w_gate_shard']}): peak RSS {result['peak_rss_gb']:.2f} GB "
              f"= {result['ratio']:.2f}x the checkpoint bytes")


if __name__ == "__main__":
    main()
