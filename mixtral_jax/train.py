"""Training: the loss, an AdamW train step that runs on a mesh, and a loop with exact resume.

Loss (per batch, over valid positions only):

    loss = CE + router_aux_loss_coef * aux + z_loss_coef * z

- CE: mean next-token cross-entropy (nats) over target positions that are valid.
- aux: the Switch Transformer load-balancing loss exactly as HF's `load_balancing_loss_func`
  computes it: router softmax over all E experts, top-k chosen from it; pooled over all layers and
  valid tokens, f[x, e] = share of (layer, token) pairs whose x-th choice is e and P[e] = mean
  router probability of e; aux = E * sum_{x,e} f[x, e] * P[e]. Perfect balance gives aux = k
  (each f[x, e] = P[e] = 1/E); layers are pooled, not averaged separately.
- z: the ST-MoE router z-loss, mean over layers and valid tokens of logsumexp(router logits)^2.

Rows are right-padded: `lengths[b]` tokens of row b are valid. The model reads tokens[:, :-1];
position t is a valid input when t < lengths[b] and a valid target when t + 1 < lengths[b].

Data order is a pure function of (seed, step) (`batch_at`), so a resumed run sees exactly the
batches an uninterrupted one would, and its losses are identical.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from . import lora as lora_lib
from .config import MixtralConfig
from .corpus import DOMAINS
from .model import REMAT, decoder, init_params, lm_head, shard_params
from .sharding import experts_split, sharding_for

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SPLIT_IDS = {"train": 0, "val": 1}  # seeds each split's data stream apart
CHECKPOINTS = "checkpoints"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and loop settings (frozen, hashable: a static argument of the jitted step)."""
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    end_lr_ratio: float = 0.1       # cosine decays to learning_rate * end_lr_ratio at `steps`
    weight_decay: float = 0.1       # AdamW; not applied to norms
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0          # global norm
    z_loss_coef: float = 0.0
    seed: int = 0
    domain_weights: tuple[float, ...] = (0.6, 0.25, 0.15)  # code, prose, math
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    save_every: int = 100
    keep: int = 3
    moe_strategy: str | None = None  # exact and differentiable; None: `train_moe_strategy()`
    remat: str = "none"             # "none" | "layer" | "dots" (mixtral_jax.model.decoder)
    grad_accum: int = 1             # micro-batches per optimizer step (batch_size rows each)
    compute_dtype: str | None = None  # None: float32 on CPU, bfloat16 on GPU/TPU (master weights float32)

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "eval_batches",
                     "save_every", "keep", "grad_accum"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.warmup_steps < 0 or not self.learning_rate > 0:
            raise ValueError("learning_rate must be > 0 and warmup_steps >= 0")
        if len(self.domain_weights) != len(DOMAINS) or min(self.domain_weights) < 0 or not sum(self.domain_weights) > 0:
            raise ValueError(f"domain_weights: {len(DOMAINS)} non-negative numbers, not all zero")
        if self.remat not in REMAT:
            raise ValueError(f"remat must be one of {', '.join(REMAT)}, got {self.remat!r}")
        if self.compute_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"compute_dtype must be float32, bfloat16 or float16, got {self.compute_dtype!r}")


@struct.dataclass
class TrainState:
    step: jax.Array      # completed optimizer steps, int32
    params: Any
    opt_state: Any


def load_balancing_loss(router_logits: jax.Array, top_k: int, mask: jax.Array | None = None) -> jax.Array:
    """HF's `load_balancing_loss_func` (see the module docstring).

    Args:
      router_logits: [L, B, T, E] (any float dtype; computed in float32).
      top_k: experts per token.
      mask: [B, T], 1 for valid tokens (None: all valid).
    Returns:
      scalar float32.
    """
    n_experts = router_logits.shape[-1]
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)            # [L, B, T, E]
    _, chosen = jax.lax.top_k(probs, top_k)                                       # [L, B, T, X]
    m = jnp.ones(probs.shape[:-1]) if mask is None else jnp.broadcast_to(mask, probs.shape[:-1])
    m = m.astype(jnp.float32)                                                     # [L, B, T]
    n = jnp.sum(m)
    share = jnp.einsum("lbtxe,lbt->xe", jax.nn.one_hot(chosen, n_experts), m) / n  # [X, E]
    prob = jnp.einsum("lbte,lbt->e", probs, m) / n                                 # [E]
    return n_experts * jnp.sum(share * prob[None, :])


def router_z_loss(router_logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean over layers and valid tokens of logsumexp(router logits)^2. [L, B, T, E] -> scalar."""
    z = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1) ** 2          # [L, B, T]
    m = jnp.ones(z.shape) if mask is None else jnp.broadcast_to(mask, z.shape).astype(jnp.float32)
    return jnp.sum(z * m) / jnp.sum(m)


def routing_stats(router_logits: jax.Array, top_k: int, mask: jax.Array) -> dict[str, jax.Array]:
    """Per layer: each expert's share of top-k assignments [L, E] and mean routing entropy [L]."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)            # [L, B, T, E]
    _, chosen = jax.lax.top_k(probs, top_k)
    m = mask.astype(jnp.float32)                                                   # [B, T]
    load = jnp.einsum("lbtxe,bt->le", jax.nn.one_hot(chosen, probs.shape[-1]), m) / (top_k * jnp.sum(m))
    entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)        # [L, B, T]
    return {"expert_load": load, "routing_entropy": jnp.einsum("lbt,bt->l", entropy, m) / jnp.sum(m)}


def target_mask(tokens: jax.Array, lengths: jax.Array, loss_mask: jax.Array | None = None) -> jax.Array:
    """[B, S-1] float32: 1 where tokens[:, t+1] is a valid target (and `loss_mask` [B, S] marks it)."""
    pos = jnp.arange(tokens.shape[1] - 1)[None, :]
    mask = pos + 1 < lengths[:, None]
    if loss_mask is not None:
        mask &= loss_mask[:, 1:].astype(bool)
    return mask.astype(jnp.float32)


def loss_parts(params, config: MixtralConfig, tc: TrainConfig, tokens, lengths, loss_mask=None, mesh=None):
    """The sums a loss is made of, for right-padded rows tokens [B, S] with `lengths` [B].

    Args:
      loss_mask: [B, S], 1 for the tokens the cross-entropy counts as targets (None: all valid).
    Returns:
      {"ce_sum": summed target cross-entropy, "targets": their count, "aux", "z",
      "expert_load" [L, E], "routing_entropy" [L]}.
    """
    dtype = compute_dtype(tc)
    if dtype != jnp.float32:  # float32 master weights, half-precision compute
        params = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    t = inputs.shape[1]
    in_len = jnp.minimum(lengths, t)
    in_mask = jnp.arange(t)[None, :] < in_len[:, None]                             # [B, T]
    tgt_mask = target_mask(tokens, lengths, loss_mask)                             # [B, T]
    # The materialised attention: differentiable, and at training lengths as fast as any.
    hidden, _, router_logits, _ = decoder(config, params, inputs, in_len, None, attention="materialized",
                                          moe_strategy=tc.moe_strategy or train_moe_strategy(mesh),
                                          remat=tc.remat, mesh=mesh)
    logits = lm_head(params, hidden.reshape(-1, hidden.shape[-1]))                 # [B*T, V]
    ce_all = optax.softmax_cross_entropy_with_integer_labels(logits, targets.reshape(-1))  # [B*T]
    return {"ce_sum": jnp.sum(ce_all * tgt_mask.reshape(-1)), "targets": jnp.sum(tgt_mask),
            "aux": load_balancing_loss(router_logits, config.top_k, in_mask),
            "z": router_z_loss(router_logits, in_mask),
            **routing_stats(jax.lax.stop_gradient(router_logits), config.top_k, in_mask)}


def loss_fn(params, config: MixtralConfig, tc: TrainConfig, tokens: jax.Array, lengths: jax.Array,
            loss_mask=None, mesh=None):
    """Total loss and its parts for right-padded rows tokens [B, S] with `lengths` [B].

    Returns:
      (loss scalar, metrics dict: loss, ce, aux, z, expert_load [L, E], routing_entropy [L]).
    """
    parts = loss_parts(params, config, tc, tokens, lengths, loss_mask, mesh)
    ce = parts["ce_sum"] / jnp.maximum(parts["targets"], 1.0)
    loss = ce + config.router_aux_loss_coef * parts["aux"] + tc.z_loss_coef * parts["z"]
    return loss, {"loss": loss, "ce": ce, "aux": parts["aux"], "z": parts["z"],
                  "expert_load": parts["expert_load"], "routing_entropy": parts["routing_entropy"]}


def compute_dtype(tc: TrainConfig):
    if tc.compute_dtype is not None:
        return jnp.dtype(tc.compute_dtype)
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)


def train_moe_strategy(mesh=None) -> str:
    """The differentiable MoE strategy for this platform: `einsum` when experts are split over the
    mesh (tokens travel to their experts), else `blocked` on CPU (XLA:CPU pads `ragged_dot` to dense
    dots) and `ragged` on GPU/TPU (grouped matmuls without weight copies)."""
    if experts_split(mesh):
        return "einsum"
    return "blocked" if jax.default_backend() == "cpu" else "ragged"


def learning_rate_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 over `warmup_steps`, then cosine to `end_lr_ratio` at `steps`."""
    return optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, tc.warmup_steps,
                                              max(tc.steps, tc.warmup_steps + 1),
                                              tc.learning_rate * tc.end_lr_ratio)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on the schedule (no weight decay on 1-D leaves: norms)."""
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(learning_rate_schedule(tc), b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay,
                    mask=lambda params: jax.tree.map(lambda a: a.ndim > 1, params)))


def init_state(config: MixtralConfig, tc: TrainConfig, mesh=None, params=None) -> TrainState:
    """Fresh parameters (seed `tc.seed`, float32) and optimizer state, placed on `mesh` if given."""
    params = init_params(config, seed=tc.seed) if params is None else params
    if mesh is not None:
        params = shard_params(config, params, mesh)
    opt_state = jax.jit(make_optimizer(tc).init)(params)  # moments inherit the params' shardings
    return TrainState(jnp.zeros((), jnp.int32), params, opt_state)


def accumulated_grads(config: MixtralConfig, tc: TrainConfig, params, tokens, lengths, loss_mask=None,
                      mesh=None, base=None, lora=None):
    """Loss gradients over `tc.grad_accum` micro-batches of `tc.batch_size` rows (tokens [K·B, S]).

    The cross-entropy is weighted by target tokens across all micro-batches, so K micro-batches give
    the gradient of one K-times-larger batch; the load-balancing and z-losses are computed per
    micro-batch (routing statistics pooled over its tokens) and averaged.
    With `lora` (a LoraConfig), `params` is the adapter and `base` the frozen model: the gradients
    are the adapter's only.
    Returns (grads, metrics: loss, ce, aux, z, expert_load, routing_entropy).
    """
    k = tc.grad_accum
    tokens, lengths = tokens.reshape(k, -1, tokens.shape[-1]), lengths.reshape(k, -1)
    masks = None if loss_mask is None else loss_mask.reshape(k, -1, loss_mask.shape[-1])
    targets = jnp.maximum(sum(jnp.sum(target_mask(tokens[i], lengths[i], None if masks is None else masks[i]))
                              for i in range(k)), 1.0)

    def micro(params, i):
        full = params if lora is None else lora_lib.attach(base, params, lora)
        parts = loss_parts(full, config, tc, tokens[i], lengths[i], None if masks is None else masks[i], mesh)
        loss = (parts["ce_sum"] / targets
                + (config.router_aux_loss_coef * parts["aux"] + tc.z_loss_coef * parts["z"]) / k)
        return loss, parts

    def accumulate(carry, i):
        grads, totals = carry
        (_, parts), g = jax.value_and_grad(micro, has_aux=True)(params, i)
        return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, totals, parts)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    first = jax.eval_shape(lambda: micro(params, 0)[1])
    (grads, totals), _ = jax.lax.scan(accumulate, (zeros, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), first)),
                                      jnp.arange(k))
    ce = totals["ce_sum"] / targets
    aux, z = totals["aux"] / k, totals["z"] / k
    loss = ce + config.router_aux_loss_coef * aux + tc.z_loss_coef * z
    return grads, {"loss": loss, "ce": ce, "aux": aux, "z": z, "expert_load": totals["expert_load"] / k,
                   "routing_entropy": totals["routing_entropy"] / k}


def train_step(config: MixtralConfig, tc: TrainConfig, state: TrainState, tokens, lengths, loss_mask=None, *,
               mesh=None, base=None, lora=None):
    """One AdamW step on `accumulated_grads` (of the adapter alone with `lora`: `state.params` is the
    adapter, `base` the frozen model). Returns (new state, metrics incl. grad_norm and lr)."""
    grads, metrics = accumulated_grads(config, tc, state.params, tokens, lengths, loss_mask, mesh, base, lora)
    updates, opt_state = make_optimizer(tc).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads), lr=learning_rate_schedule(tc)(state.step))
    return TrainState(state.step + 1, params, opt_state), metrics


# The state is donated: parameters and moments are updated in place.
train_step_jit = jax.jit(train_step, static_argnums=(0, 1), static_argnames=("mesh", "lora"), donate_argnums=(2,))


def _eval_ce(config, tc, params, tokens, lengths, mesh=None):
    return loss_fn(params, config, tc, tokens, lengths, mesh=mesh)[1]["ce"]


_eval_ce_jit = jax.jit(_eval_ce, static_argnums=(0, 1), static_argnames=("mesh",))


def batch_at(corpus, split: str, step: int, tc: TrainConfig, domain: str | None = None,
             rows: int | None = None) -> np.ndarray:
    """The batch for `step`: [rows (default batch_size), seq_len + 1] windows at random offsets of the
    streams.

    Each row's domain is drawn by `tc.domain_weights` (or fixed to `domain`). A pure function of
    (tc.seed, split, step): resuming replays the same data, and K micro-batches of B rows are the
    rows of one batch of K·B.
    """
    rng = np.random.default_rng([tc.seed, SPLIT_IDS[split], step])
    p = np.asarray(tc.domain_weights, np.float64) / sum(tc.domain_weights)
    out = []
    for _ in range(rows or tc.batch_size):
        d = domain or DOMAINS[rng.choice(len(DOMAINS), p=p)]
        stream = corpus[split, d]
        start = int(rng.integers(0, max(1, len(stream) - tc.seq_len - 1)))
        row = np.asarray(stream[start:start + tc.seq_len + 1], np.int32)
        out.append(np.pad(row, (0, tc.seq_len + 1 - len(row))))
    return np.stack(out)


def evaluate(config: MixtralConfig, tc: TrainConfig, params, corpus, place: Callable, mesh=None) -> dict[str, float]:
    """Held-out cross-entropy per domain on `tc.eval_batches` fixed batches each."""
    out = {}
    for i, d in enumerate(DOMAINS):
        losses = []
        for j in range(tc.eval_batches):
            tokens = batch_at(corpus, "val", j * len(DOMAINS) + i, tc, domain=d)
            lengths = np.full((len(tokens),), tokens.shape[1], np.int32)
            losses.append(float(_eval_ce_jit(config, tc, params, *place(tokens, lengths), mesh=mesh)))
        out[d] = float(np.mean(losses))
    return out


def _placer(tc: TrainConfig, mesh):
    """Host batch (tokens, lengths[, loss mask]) -> device arrays, rows split over the mesh's batch
    axes (every process builds the same global batch, so this works multi-host too)."""
    if mesh is None:
        return lambda *arrays: tuple(None if a is None else jnp.asarray(a) for a in arrays)

    def put(a, axes):
        return None if a is None else jax.make_array_from_callback(
            a.shape, sharding_for(a.shape, axes, mesh), lambda i: a[i])

    def place(*arrays):  # tokens, lengths[, loss mask]
        return tuple(put(a, axes) for a, axes in zip(arrays, (("batch", "sequence"), ("batch",), ("batch", "sequence"))))
    return place


# Fields that change the numbers of a run: resuming with other values would not be exact.
_RUN_FIELDS = ("batch_size", "seq_len", "learning_rate", "warmup_steps", "end_lr_ratio", "weight_decay",
               "b1", "b2", "grad_clip", "z_loss_coef", "seed", "domain_weights", "moe_strategy", "grad_accum",
               "compute_dtype")


def _run_meta(config: MixtralConfig, tc: TrainConfig, extra: dict | None = None) -> dict:
    return {"config": config.to_dict(), "train": {k: getattr(tc, k) for k in _RUN_FIELDS} | {"steps": tc.steps},
            "extra": extra or {}}


def _check_resumable(meta: dict, config: MixtralConfig, tc: TrainConfig, folder: str, extra: dict | None) -> None:
    want = json.loads(json.dumps(_run_meta(config, tc, extra)))
    if meta["config"] != want["config"]:
        raise ValueError(f"{folder}: holds a run of another model config; use a new output folder")
    changed = sorted(k for k in set(meta.get("extra", {})) | set(want["extra"])
                     if meta.get("extra", {}).get(k) != want["extra"].get(k))
    if changed:
        raise ValueError(f"{folder}: holds a run with other {', '.join(changed)}; use a new output folder")
    defaults = json.loads(json.dumps({k: getattr(TrainConfig(), k) for k in _RUN_FIELDS}))  # older runs lack some
    changed = [k for k in _RUN_FIELDS if meta["train"].get(k, defaults[k]) != want["train"][k]]
    if changed:
        raise ValueError(f"{folder}: cannot resume exactly with changed {', '.join(changed)}; "
                         "use the original values or a new output folder")
    if meta["train"]["steps"] != tc.steps:
        log.warning("resuming with steps=%d (was %d): the learning-rate schedule changes",
                    tc.steps, meta["train"]["steps"])


def _trim_metrics(path: str, step: int) -> None:
    """Drop log lines past the step a run resumes from (they will be written again)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(keep)


def _to_python(tree) -> Any:
    return jax.tree.map(lambda a: np.asarray(a).tolist(), jax.device_get(tree))


def train(config: MixtralConfig, tc: TrainConfig, out: str, corpus=None, *, mesh=None, progress: bool = True,
          params=None, stop_after: int | None = None, batches: Callable | None = None, base=None,
          lora: lora_lib.LoraConfig | None = None, extra_meta: dict | None = None) -> dict:
    """Train, or resume the run in `out`, up to `tc.steps` steps.

    Args:
      config: the model.
      tc: the run's settings.
      out: run folder: `checkpoints/` (orbax CheckpointManager: async saves every `save_every`
        steps and at the end, keeping `keep`) and `metrics.jsonl` (one line per `log_every` steps:
        step, loss, ce, aux, z, lr, grad_norm, tokens_per_s, expert_load [L][E], routing_entropy
        [L]; one line per evaluation: step, eval {domain: held-out ce}).
      corpus: `mixtral_jax.corpus.load_corpus(folder)`, or None with `batches`.
      mesh: a mesh to train on (data parallel over `data`, parameters per the sharding rules).
      progress: show a progress bar (on stderr, when it is a terminal).
      params: initial parameters instead of a fresh init (ignored when resuming).
      stop_after: stop (and save) once this many steps are done, as an interruption would; a
        later call resumes. None runs to `tc.steps`.
      batches: instead of the corpus, step -> (tokens [K·B, S+1], lengths [K·B], loss mask
        [K·B, S+1] or None) as numpy arrays, a pure function of the step (so resuming is exact);
        no held-out evaluation then.
      base, lora: LoRA: the state holds a fresh adapter (`lora_lib.init_adapter`, seed tc.seed)
        and only it is trained; `base` is the frozen model (placed on `mesh` by the caller).
      extra_meta: further facts of the run (JSON) a resume must find unchanged, e.g. the data's digest.
    Returns:
      {"state": TrainState, "history": the metrics records of this call, "eval": the last eval}.
    Raises:
      KeyboardInterrupt after saving the current step (rerun to resume).
    """
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    os.makedirs(out, exist_ok=True)
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(out, CHECKPOINTS)),
        options=ocp.CheckpointManagerOptions(max_to_keep=tc.keep, enable_async_checkpointing=True))
    metrics_path = os.path.join(out, METRICS_FILE)
    if lora is not None:
        adapter = lora_lib.init_adapter(config, lora, tc.seed)
        if mesh is not None:
            adapter = jax.tree.map(lambda a: jax.device_put(a, sharding_for(a.shape, (None,) * a.ndim, mesh)), adapter)
        state = TrainState(jnp.zeros((), jnp.int32), adapter, jax.jit(make_optimizer(tc).init)(adapter))
        extra_meta = {**(extra_meta or {}), "lora": dataclasses.asdict(lora)}
    else:
        state = init_state(config, tc, mesh, params)
    latest = manager.latest_step()
    if latest is not None:
        meta = manager.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        _check_resumable(meta, config, tc, out, extra_meta)
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                                dataclasses.asdict(state))
        restored = manager.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        state = TrainState(**restored["state"])
        _trim_metrics(metrics_path, latest)
        log.info("resumed %s at step %d", out, latest)
    step = int(state.step)

    def save(step: int) -> None:
        if manager.latest_step() != step:
            manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(dataclasses.asdict(state)),
                                                       meta=ocp.args.JsonSave(_run_meta(config, tc, extra_meta))))

    place = _placer(tc, mesh)
    history, last_eval = [], None
    bar = tqdm(total=tc.steps, initial=step, desc="train", unit="step", disable=not progress)
    clock, seen = time.perf_counter(), 0
    try:
        with open(metrics_path, "a", encoding="utf-8") as log_file:
            while step < min(tc.steps, stop_after or tc.steps):
                if batches is None:
                    tokens = batch_at(corpus, "train", step, tc, rows=tc.batch_size * tc.grad_accum)
                    lengths, loss_mask = np.full((len(tokens),), tokens.shape[1], np.int32), None
                else:
                    tokens, lengths, loss_mask = batches(step)
                state, metrics = train_step_jit(config, tc, state, *place(tokens, lengths, loss_mask), mesh=mesh,
                                                base=base, lora=lora)
                step, seen = step + 1, seen + int(np.sum(np.maximum(lengths - 1, 0)))
                if step % tc.log_every == 0 or step == tc.steps:
                    now = time.perf_counter()
                    record = {"step": step, **_to_python(metrics), "tokens_per_s": seen / (now - clock)}
                    clock, seen = now, 0
                    history.append(record)
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if corpus is not None and (step % tc.eval_every == 0 or step == tc.steps):
                    last_eval = evaluate(config, tc, state.params, corpus, place, mesh)
                    log_file.write(json.dumps({"step": step, "eval": last_eval}) + "\n")
                    log_file.flush()
                    log.info("step %d held-out ce %s", step, last_eval)
                    clock = time.perf_counter()  # evaluation time is not training throughput
                if step % tc.save_every == 0 or step in (tc.steps, stop_after):
                    save(step)
                bar.update(1)
    except KeyboardInterrupt:
        save(step)
        log.warning("interrupted at step %d; saved to %s (run again to resume)", step, out)
        raise
    finally:
        bar.close()
        manager.wait_until_finished()
        manager.close()
    return {"state": state, "history": history, "eval": last_eval}


def export_run(run: str, out: str, *, step: int | None = None, dtype=None) -> int:
    """Write a training checkpoint of run folder `run` (default its latest step) as a project
    checkpoint `out` that `load` and `--checkpoint` take (with the Mixtral v1 tokenizer when the
    vocabulary is its). Returns the step exported."""
    import orbax.checkpoint as ocp

    from .checkpoint import save
    from .tokenizer import Tokenizer

    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(run, CHECKPOINTS)))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{run}: no training checkpoints")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    config = MixtralConfig.from_dict(meta["config"])
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["train"].items()}
    tc = TrainConfig(**fields)
    abstract = jax.eval_shape(lambda: dataclasses.asdict(init_state(config, tc)))
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    manager.close()
    tok = Tokenizer()
    save(out, config, state["params"], dtype=dtype, tokenizer=tok.path if config.vocab_size == tok.vocab_size else None)
    return step
