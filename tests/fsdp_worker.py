"""Run by test_finetune.py in a fresh process with 8 host devices.

Usage: python fsdp_worker.py
Prints one JSON line per mesh (fsdp=8; fsdp=4,expert=2): the training step's loss and updated
parameters against one device, each parameter's and moment's per-device share read from its
sharding against the planned share, and per-device bytes against `plan_training`.
"""

import json
import math
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

import mixtral_jax as mj  # noqa: E402
from mixtral_jax import train as tr  # noqa: E402
from mixtral_jax.model import ParamSpec, param_specs  # noqa: E402
from mixtral_jax.plan import plan_training  # noqa: E402
from mixtral_jax.sharding import axis_sizes, shard_shape  # noqa: E402

# d_model, heads x head_dim, d_ff and the vocabulary all divide by 8.
config = mj.MixtralConfig.tiny().replace(vocab_size=512, d_ff=256)
# A fine-tuning learning rate: Adam's first step is lr * g / (|g| + eps), which turns float noise in
# a gradient near zero into up to lr of difference, so the parameters compare to lr-sized noise.
tc = tr.TrainConfig(steps=10, batch_size=8, seq_len=32, warmup_steps=0, learning_rate=1e-4)
grads_jit = jax.jit(tr.accumulated_grads, static_argnums=(0, 1), static_argnames=("mesh",))
rng = np.random.default_rng(0)
tokens = rng.integers(3, config.vocab_size, (8, 33)).astype(np.int32)
lengths = np.array([33, 33, 20, 33, 7, 33, 33, 30], np.int32)

one_grads = jax.device_get(grads_jit(config, tc, tr.init_state(config, tc).params, tokens, lengths)[0])
one, one_metrics = tr.train_step_jit(config, tc, tr.init_state(config, tc), tokens, lengths)
one_params = jax.device_get(one.params)
specs = param_specs(config)
spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, ParamSpec))

for mesh_args in ({"fsdp": 8}, {"fsdp": 4, "expert": 2}):
    mesh = mj.make_mesh(**mesh_args)
    state = tr.init_state(config, tc, mesh)
    place = tr._placer(tc, mesh)
    grads = jax.device_get(grads_jit(config, tc, state.params, *place(tokens, lengths), mesh=mesh)[0])
    grad_diff = max(float(np.max(np.abs(np.asarray(a) - b)) / (np.max(np.abs(b)) + 1e-30))
                    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(one_grads)))
    state, metrics = tr.train_step_jit(config, tc, state, *place(tokens, lengths), mesh=mesh)
    sizes = axis_sizes(mesh)
    shares, planned_shares, per_device = [], [], 0
    moments = [s for s in jax.tree.leaves(state.opt_state) if getattr(s, "ndim", 0) > 0]
    for spec, leaf in zip(spec_leaves, jax.tree.leaves(state.params)):
        shard = leaf.addressable_shards[0].data
        shares.append(shard.size / leaf.size)
        planned_shares.append(math.prod(shard_shape(spec.shape, spec.axes, sizes)) / math.prod(spec.shape))
    for leaf in jax.tree.leaves(state.params) + moments:
        per_device += leaf.addressable_shards[0].data.nbytes
    # the moments take the parameters' shardings
    moment_shares = [m.addressable_shards[0].data.size / m.size for m in moments]
    plan = plan_training(config, sizes, batch=8, seq_len=32, compute_dtype="float32")
    diff = max(float(np.max(np.abs(np.asarray(a) - b)))
               for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(one_params)))
    print(json.dumps({
        "mesh": mesh_args, "loss": float(metrics["loss"]), "one_device_loss": float(one_metrics["loss"]),
        "param_max_diff": diff, "grad_max_rel_diff": grad_diff,
        "matrix_shares": [s for s, spec in zip(shares, spec_leaves) if len(spec.shape) > 1],
        "shares": shares, "planned_shares": planned_shares, "moment_shares": moment_shares,
        "per_device_bytes": per_device, "planned_bytes": plan["parameters"] + plan["optimizer_state"]}), flush=True)
