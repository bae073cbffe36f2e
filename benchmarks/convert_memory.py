"""Peak memory and throughput of `mixtral-jax convert` on a 1.6 GB bfloat16 HF checkpoint.

Builds a random `small`-config checkpoint (8 layers, D=1024, F=3584, V=32000; bfloat16, one
safetensors shard per layer) layer by layer in one child process, converts it in another, and
prints the converting child's own peak RSS (wait4) and MB/s, for each of `--runs` consecutive
conversions of the same source. The parent imports only the standard library, so nothing it holds
can count toward the children's peaks. Usage:

    python benchmarks/convert_memory.py [--runs N] [--workdir DIR] [--json]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

from measure import run_measured


def build_source(path):
    """Child process: write the random bfloat16 `small` checkpoint as an HF folder."""
    import ml_dtypes

    from mixtral_convert import write_folder
    from mixtral_jax import MixtralConfig

    config = MixtralConfig.small()
    write_folder(path, config, random_items(config), "hf", ml_dtypes.bfloat16)


def random_items(config, seed=0):
    """(item, leaves) pairs of random bfloat16 weights, one item at a time."""
    import ml_dtypes
    import numpy as np

    from mixtral_jax.model import layer_name, param_specs

    rng = np.random.default_rng(seed)
    specs = param_specs(config)

    def draw(spec):
        return (0.02 * rng.standard_normal(spec.shape, np.float32)).astype(ml_dtypes.bfloat16)

    yield "globals", {k: draw(v) for k, v in specs.items() if not k.startswith("layers_")}
    for i in range(config.n_layers):
        yield layer_name(i), {k: draw(v) for k, v in specs[layer_name(i)].items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="consecutive conversions of the same source")
    parser.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--build", metavar="DIR", help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.build:
        return build_source(args.build)
    runs = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src = os.path.join(tmp, "hf")
        subprocess.run([sys.executable, __file__, "--build", src], check=True)
        src_bytes = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
        for i in range(args.runs):
            out = os.path.join(tmp, f"ckpt{i}")
            _, peak, wall = run_measured([sys.executable, "-m", "mixtral_jax.cli", "convert", src, out])
            runs.append({"peak_rss_mb": peak / 1e6, "peak_over_source": peak / src_bytes, "wall_s": wall,
                         "mb_per_s": src_bytes / 1e6 / wall})
            shutil.rmtree(out)
            if not args.json:
                print(f"run {i + 1}: peak RSS {peak / 1e6:.0f} MB = {peak / src_bytes:.3f}x the source, "
                      f"{wall:.1f} s ({src_bytes / 1e6 / wall:.0f} MB/s, process start-up included)", flush=True)
        out = os.path.join(tmp, "ckpt")
        subprocess.run([sys.executable, "-m", "mixtral_jax.cli", "convert", src, out], check=True,
                       capture_output=True)
        info = json.loads(subprocess.run([sys.executable, "-m", "mixtral_jax.cli", "info", out, "--json"],
                                         check=True, capture_output=True, text=True).stdout)
    result = {"source_gb": src_bytes / 1e9, "output_dtype": info["dtype"], "runs": runs,
              "max_peak_over_source": max(r["peak_over_source"] for r in runs)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['source_gb']:.2f} GB bfloat16 HF checkpoint (small config), output "
              f"{result['output_dtype']}; highest peak RSS {result['max_peak_over_source']:.3f}x the source "
              f"over {len(runs)} runs")


if __name__ == "__main__":
    main()
