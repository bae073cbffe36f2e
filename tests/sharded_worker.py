"""Run by test_sharding.py in a fresh process with 8 host devices (or as one of two processes).

Usage: python sharded_worker.py CKPT DATA EXPERT TENSOR [COORDINATOR NUM_PROCESSES PROCESS_ID]
Prints one JSON line: logits max |diff| vs one device, greedy tokens (sharded and one-device),
the experts per device shard, and which collectives the compiled MoE forward contains.
"""

import json
import os
import re
import sys

if len(sys.argv) > 5:  # one of several processes: 4 host devices each
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
else:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

if len(sys.argv) > 5:
    jax.distributed.initialize(sys.argv[5], num_processes=int(sys.argv[6]), process_id=int(sys.argv[7]))

import mixtral_jax as mj  # noqa: E402
from mixtral_jax import model as model_lib  # noqa: E402

ckpt = sys.argv[1]
data, expert, tensor = (int(a) for a in sys.argv[2:5])
mesh = mj.make_mesh(data, expert, tensor)
sharded = mj.load(ckpt, mesh=mesh)
tokens = np.random.default_rng(0).integers(3, sharded.config.vocab_size, (4, 24))
logits = np.asarray(jax.jit(lambda p, t: mj.forward(sharded.config, p, t), out_shardings=jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec()))(sharded.params, tokens))
prompts = [tokens[0, :5].tolist(), tokens[1, :17].tolist(), tokens[2, :1].tolist(), tokens[3, :9].tolist()]
greedy = mj.generate(sharded, prompts, max_new_tokens=12, stop_tokens=[])
hlo = model_lib._forward_jit.lower(sharded.config, sharded.params, tokens, None, None, moe_strategy="einsum",
                                   capacity_factor=None, group_size=8, mesh=mesh).compile().as_text()
w_gate = sharded.params["layers_0"]["w_gate"]
c = sharded.config
weight_shapes = {f"[{c.n_experts},{c.d_model},{c.d_ff}]", f"[{c.n_experts},{c.d_ff},{c.d_model}]"}
moved = [m.group(1) for m in re.finditer(r"= \w+(\[[\d,]*\])\S* (?:all-gather|all-to-all|collective-permute)\(", hlo)]
result = {
    "process": jax.process_index(), "devices": jax.device_count(),
    "experts_per_shard": sorted({s.data.shape[0] for s in w_gate.addressable_shards}),
    "greedy": greedy,
    "collectives": sorted(c for c in ("all-to-all", "all-reduce", "all-gather", "reduce-scatter",
                                      "collective-permute") if c in hlo),
    "moved_shapes": sorted(set(moved)),
    "expert_weights_moved": any(shape in weight_shapes for shape in moved),
}
if jax.process_count() == 1:
    single = mj.load(ckpt)
    result["max_diff"] = float(np.max(np.abs(logits - np.asarray(mj.forward(single.config, single.params, tokens)))))
    result["greedy_single"] = mj.generate(single, prompts, max_new_tokens=12, stop_tokens=[])
if jax.process_index() == 0:
    print(json.dumps(result), flush=True)
if jax.process_count() > 1:
    jax.distributed.shutdown()
