"""Generation: prefill, then a `lax.while_loop` of decode steps, all inside one jit.

Prompts are right-padded into one batch and padded in length to a few buckets (powers of two), so
a sweep of prompt lengths compiles a handful of programs. Sampling parameters are per-row traced
arrays: changing temperature, top-k/p, min-p, seeds or stop tokens compiles nothing. Each row's
random stream depends only on its own seed and step, so a row's output does not depend on what it
is batched with.

Penalties come first, on the raw logits: HF's repetition penalty over the prompt and the output,
then OpenAI's frequency and presence penalties over the output (vLLM's order). Then the filters, in
HF's order: temperature, top-k, top-p, min-p. Temperature 0 is greedy (over the penalised logits).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from . import attention as attention_lib
from .kvcache import DTYPES as KV_DTYPES
from .model import Model, check_prefill_chunk, decoder, init_cache, lm_head
from .sharding import constrain, mesh_of

MIN_BUCKET = 16
DEFAULT_EOS = 2  # Mixtral's </s>, for models without a tokenizer
DEFAULT_PREFILL_CHUNK = 1024  # BENCHMARKS.md: long-prompt prefill time and memory against chunk size


@dataclasses.dataclass(frozen=True)
class Static:
    """What the jitted programs are specialised on (hashable; a static argument)."""
    cache_len: int                  # KV cache slots
    out_len: int                    # generated-token buffer width
    prefill_chunk: int | None       # prompt tokens per prefill step; None: the whole prompt at once
    attention: str                  # mixtral_jax.attention implementation
    kv_dtype: str | None = None     # KV cache dtype (mixtral_jax.kvcache); None: the parameters'
    mesh: Any = None                # the parameters' mesh


@flax.struct.dataclass
class SamplingParams:
    """Per-row sampling parameters (all [B])."""
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array   # 1 disables
    presence_penalty: jax.Array     # 0 disables
    frequency_penalty: jax.Array    # 0 disables


@flax.struct.dataclass
class DecodeState:
    """The loop carry: everything one decode step reads and writes."""
    cache: Any                 # KV cache
    last: jax.Array            # [B] the token fed to the next step
    step: jax.Array            # () number of tokens generated so far (loop counter)
    done: jax.Array            # [B] row has emitted a stop token or its max_new_tokens
    n_new: jax.Array           # [B] tokens generated per row
    tokens: jax.Array          # [B, N] generated tokens
    logprobs: jax.Array        # [B, N] log-softmax of the raw logits at each chosen token
    counts: jax.Array          # [B, V] int32 how often each token was generated
    in_prompt: jax.Array       # [B, V] bool whether each token occurs in the prompt


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def apply_penalties(logits: jax.Array, p: SamplingParams, counts: jax.Array, in_prompt: jax.Array) -> jax.Array:
    """Repetition penalty (HF), then frequency and presence penalties (OpenAI).

    HF's `RepetitionPenaltyLogitsProcessor`: the logit of a token already in the prompt or the output
    is divided by the penalty when positive and multiplied by it otherwise. OpenAI: subtract
    `frequency * count + presence * [count > 0]`, counting generated tokens only.

    Args:
      logits: [B, V] float32 raw logits.
      p: per-row parameters.
      counts: [B, V] int32 generated-token counts; in_prompt: [B, V] bool.
    Returns:
      [B, V] float32 penalised logits.
    """
    generated = counts > 0
    rp = p.repetition_penalty[:, None]
    x = jnp.where(in_prompt | generated, jnp.where(logits < 0, logits * rp, logits / rp), logits)
    return (x - p.frequency_penalty[:, None] * counts.astype(jnp.float32)
            - p.presence_penalty[:, None] * generated.astype(jnp.float32))


def sort_floats(x: jax.Array) -> jax.Array:
    """float32 rows sorted ascending along the last axis: `jnp.sort`'s values (only the order of
    -0.0 and 0.0, equal values, may differ: -0.0 comes first).

    Sorted as int32 keys in the same order (a float's bits with the magnitude bits flipped when it
    is negative): XLA:CPU sorts [8, 32000] int32 in ~13 ms and float32 in ~56 ms.
    """
    flip = lambda i: i ^ ((i >> 31) & 0x7FFFFFFF)  # noqa: E731 - its own inverse
    keys = flip(jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32))
    return jax.lax.bitcast_convert_type(flip(jnp.sort(keys, axis=-1)), jnp.float32)


def filter_logits(logits: jax.Array, p: SamplingParams) -> jax.Array:
    """Temperature, top-k, top-p, min-p (HF's order and tie rules); removed tokens get -inf.

    Args:
      logits: [B, V] float32.
      p: per-row parameters; top_k 0 and top_p 1 and min_p 0 disable their filters.
    Returns:
      [B, V] float32 filtered, temperature-scaled logits (for temperature 0 rows: scaled by 1).
    """
    neg = jnp.finfo(jnp.float32).min
    temp = jnp.where(p.temperature > 0, p.temperature, 1.0)[:, None]
    x = logits / temp

    def truncate(x):
        asc = sort_floats(x)                                               # [B, V], one sort for both filters
        k = jnp.clip(p.top_k, 1, x.shape[-1])
        kth = jnp.take_along_axis(asc, (x.shape[-1] - k)[:, None], axis=-1)  # ties at the k-th stay
        by_k = p.top_k[:, None] > 0
        x = jnp.where(by_k & (x < kth), neg, x)
        # top-p over what top-k kept: sending the values below the k-th to `neg` keeps the order,
        # so the kept logits sorted are `asc` with those entries replaced.
        asc = jnp.where(by_k & (asc < kth), neg, asc)
        # Drop the least likely tokens whose cumulative probability stays <= 1 - top_p.
        cum = jnp.cumsum(jax.nn.softmax(asc, axis=-1), axis=-1)
        remove = cum <= (1.0 - p.top_p)[:, None]
        remove = remove.at[:, -1].set(False)                               # keep at least one
        n_removed = jnp.sum(remove, axis=-1)
        cutoff = jnp.take_along_axis(asc, jnp.maximum(n_removed - 1, 0)[:, None], axis=-1)
        return jnp.where((n_removed[:, None] > 0) & (x <= cutoff), neg, x)

    x = jax.lax.cond(jnp.any(p.top_k > 0) | jnp.any(p.top_p < 1.0), truncate, lambda x: x, x)
    # min-p: drop tokens less likely than min_p times the most likely one.
    probs = jax.nn.softmax(x, axis=-1)
    x = jnp.where(probs < p.min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True), neg, x)
    return x


def greedy(logits: jax.Array) -> jax.Array:
    """`jnp.argmax(logits, axis=-1)` as int32 (the first maximum; the first NaN if a row has one),
    as a max and a min over the vocabulary: XLA:CPU runs argmax's variadic reduce at ~4 ns an
    element (139 us a step for one 32000-token row, 580 us for eight; this form 7 and 64 us).

    Args:
      logits: [B, V] float.
    Returns:
      [B] int32 token ids.
    """
    v = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)                                   # [B, 1]
    hit = jnp.where(jnp.isnan(top), jnp.isnan(logits), logits == top)               # [B, V]
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)        # [B, V]
    return jnp.min(jnp.where(hit, ids, v), axis=-1)


def sample(logits: jax.Array, p: SamplingParams, keys: jax.Array) -> jax.Array:
    """One token per row: argmax where temperature is 0, else a draw from the filtered logits.

    Args:
      logits: [B, V] float32 raw logits.
      p: per-row parameters.
      keys: [B] PRNG keys.
    Returns:
      [B] int32 tokens.
    """
    best = greedy(logits)

    def draw():
        drawn = jax.vmap(jax.random.categorical)(keys, filter_logits(logits, p)).astype(jnp.int32)
        return jnp.where(p.temperature > 0, drawn, best)

    # The filters sort the vocabulary twice: skip them when every row is greedy.
    return jax.lax.cond(jnp.any(p.temperature > 0), draw, lambda: best)


def _choose(state: DecodeState, logits, p, seeds, stop, max_new, mesh) -> DecodeState:
    """Sample the next token of every row from `logits` [B, V] and record it.

    The small per-row outputs are replicated, so every process of a multi-host run can read them.
    """
    logits = constrain(logits, (None, None), mesh)
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), state.step))(seeds)
    token = sample(apply_penalties(logits, p, state.counts, state.in_prompt), p, keys)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
    live = ~state.done
    n_new = state.n_new + live
    done = state.done | (live & (jnp.isin(token, stop) | (n_new >= max_new)))
    col = jnp.minimum(state.step, state.tokens.shape[1] - 1)
    rows = lambda a: constrain(a, (None,) * a.ndim, mesh)  # noqa: E731 - replicated
    counts = state.counts.at[jnp.arange(token.shape[0]), token].add(live.astype(jnp.int32))
    return state.replace(
        last=rows(token), step=state.step + 1, done=rows(done), n_new=rows(n_new), counts=rows(counts),
        tokens=rows(state.tokens.at[:, col].set(jnp.where(live, token, state.tokens[:, col]))),
        logprobs=rows(state.logprobs.at[:, col].set(jnp.where(live, logprob, 0.0))))


def prefill_cache(config, params, tokens, lengths, cache, *, chunk: int | None, attention: str, mesh=None):
    """Write the prompts into `cache`; return (hidden state at each row's last prompt token [B, D],
    cache). Prompts longer than `chunk` go through in chunks of `chunk` tokens (a loop with one
    compiled body), so the largest activation is one chunk's."""
    b, t = tokens.shape
    if not chunk or t <= chunk:
        hidden, cache, _, _ = decoder(config, params, tokens, lengths, cache, mesh=mesh, attention=attention)
        return jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0], cache
    n_chunks = -(-t // chunk)
    tokens = jnp.pad(tokens, ((0, 0), (0, n_chunks * chunk - t)))

    def one_chunk(c, carry):
        cache, last = carry
        part = jax.lax.dynamic_slice_in_dim(tokens, c * chunk, chunk, axis=1)       # [B, chunk]
        valid = jnp.clip(lengths - c * chunk, 0, chunk)                             # [B]
        hidden, cache, _, _ = decoder(config, params, part, valid, cache, mesh=mesh, attention=attention)
        here = jnp.take_along_axis(hidden, jnp.maximum(valid - 1, 0)[:, None, None], axis=1)[:, 0]
        return cache, jnp.where(((lengths - 1) // chunk == c)[:, None], here, last)

    last = jnp.zeros((b, config.d_model), params["embed"].dtype)
    cache, last = jax.lax.fori_loop(0, n_chunks, one_chunk, (cache, last))
    return last, cache


def prefill(config, params, tokens, lengths, p, seeds, stop, max_new, *, static: Static) -> DecodeState:
    """Run the prompts through the model and choose each row's first new token.

    Args:
      tokens: [B, T] right-padded prompts; lengths: [B] their lengths.
      p: SamplingParams; seeds: [B] uint32; stop: [n] stop tokens (-1 pads); max_new: [B].
      static: cache and buffer sizes, prefill chunk, attention, mesh.
    """
    b, t = tokens.shape
    vocab = config.vocab_size
    mesh, out_len = static.mesh, static.out_len
    cache = init_cache(config, b, static.cache_len, dtype=static.kv_dtype or params["embed"].dtype)
    last_hidden, cache = prefill_cache(config, params, tokens, lengths, cache, chunk=static.prefill_chunk,
                                       attention=static.attention, mesh=mesh)  # [B, D]
    prompt_ids = jnp.where(jnp.arange(t)[None, :] < lengths[:, None], tokens, vocab)   # padding -> dropped
    in_prompt = jnp.zeros((b, vocab), bool).at[jnp.arange(b)[:, None], prompt_ids].set(True, mode="drop")
    state = DecodeState(cache=cache, last=jnp.zeros((b,), jnp.int32), step=jnp.zeros((), jnp.int32),
                        done=jnp.zeros((b,), bool), n_new=jnp.zeros((b,), jnp.int32),
                        tokens=jnp.zeros((b, out_len), jnp.int32),
                        logprobs=jnp.zeros((b, out_len), jnp.float32),
                        counts=jnp.zeros((b, vocab), jnp.int32), in_prompt=in_prompt)
    return _choose(state, lm_head(params, last_hidden, mesh), p, seeds, stop, max_new, mesh)


def decode_step(config, params, state: DecodeState, p, seeds, stop, max_new, *, static: Static) -> DecodeState:
    """Feed each row's last token and choose the next one."""
    hidden, cache, _, _ = decoder(config, params, state.last[:, None], None, state.cache, mesh=static.mesh,
                                  attention=static.attention)
    return _choose(state.replace(cache=cache), lm_head(params, hidden[:, 0], static.mesh), p, seeds, stop, max_new,
                   static.mesh)


def _generate(config, params, tokens, lengths, p, seeds, stop, max_new, *, static: Static):
    state = prefill(config, params, tokens, lengths, p, seeds, stop, max_new, static=static)
    return jax.lax.while_loop(
        lambda s: ~jnp.all(s.done),
        lambda s: decode_step(config, params, s, p, seeds, stop, max_new, static=static), state)


_generate_jit = jax.jit(_generate, static_argnames=("static",))
_prefill_jit = jax.jit(prefill, static_argnames=("static",))
_step_jit = jax.jit(decode_step, donate_argnames=("state",), static_argnames=("static",))


def compiled_programs() -> int:
    """How many programs the sampler's jitted functions have compiled in this process."""
    return sum(f._cache_size() for f in (_generate_jit, _prefill_jit, _step_jit))


@dataclasses.dataclass(frozen=True)
class _Batch:
    """Validated, host-side (numpy) inputs of one generate call."""
    tokens: np.ndarray
    lengths: np.ndarray
    params: SamplingParams
    seeds: np.ndarray
    stop: np.ndarray
    max_new: np.ndarray
    static: Static


def _per_row(name: str, value, n: int, dtype) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(n, arr)
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a scalar or one value per prompt ({n}), got {np.shape(value)}")
    if np.issubdtype(dtype, np.integer) and np.any(arr != np.round(arr)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return arr.astype(dtype)


def prepare(model: Model, prompts, *, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
            repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, stop_tokens=None,
            seed=0, prefill_chunk=DEFAULT_PREFILL_CHUNK, attention="auto", kv_dtype=None) -> _Batch:
    """Validate everything on the host (ValueError naming the value) and build padded arrays."""
    config = model.config
    attention_lib.check_name(attention)
    if kv_dtype is not None and kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    check_prefill_chunk(prefill_chunk)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
    ids = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if model.tokenizer is None:
                raise ValueError("string prompts need a model with a tokenizer; pass token ids")
            prompt = model.tokenizer.encode(prompt, bos=True)
        prompt = np.asarray(prompt)
        if prompt.ndim != 1 or prompt.size == 0:
            raise ValueError(f"prompt {i} is empty or not a flat list of token ids")
        if not np.issubdtype(prompt.dtype, np.integer):
            raise ValueError(f"prompt {i} must hold integer token ids")
        if prompt.min() < 0 or prompt.max() >= config.vocab_size:
            bad = prompt.min() if prompt.min() < 0 else prompt.max()
            raise ValueError(f"prompt {i}: token id {bad} out of range [0, {config.vocab_size})")
        ids.append(prompt)
    n = len(ids)
    max_new = _per_row("max_new_tokens", max_new_tokens, n, np.int32)
    if np.any(max_new < 1):
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    temperature = _per_row("temperature", temperature, n, np.float32)
    top_k = _per_row("top_k", top_k, n, np.int32)
    top_p = _per_row("top_p", top_p, n, np.float32)
    min_p = _per_row("min_p", min_p, n, np.float32)
    rep_pen = _per_row("repetition_penalty", repetition_penalty, n, np.float32)
    presence = _per_row("presence_penalty", presence_penalty, n, np.float32)
    frequency = _per_row("frequency_penalty", frequency_penalty, n, np.float32)
    seeds = _per_row("seed", seed, n, np.int64)
    for name, arr, ok in (("temperature", temperature, temperature >= 0), ("top_k", top_k, top_k >= 0),
                          ("top_p", top_p, (top_p > 0) & (top_p <= 1)),
                          ("min_p", min_p, (min_p >= 0) & (min_p <= 1)),
                          ("repetition_penalty", rep_pen, rep_pen > 0),
                          ("presence_penalty", presence, np.abs(presence) <= 2),
                          ("frequency_penalty", frequency, np.abs(frequency) <= 2),
                          ("seed", seeds, (seeds >= 0) & (seeds < 2**32))):
        if not np.all(ok & np.isfinite(arr)):
            raise ValueError(f"{name} out of range: {arr[~(ok & np.isfinite(arr))][0]}")
    lengths = np.array([len(p) for p in ids], np.int32)
    longest = int(np.max(lengths + max_new))
    if longest > config.max_seq_len:
        raise ValueError(f"prompt length + max_new_tokens = {longest} exceeds the context "
                         f"(max_seq_len {config.max_seq_len})")
    if stop_tokens is None:
        stop_tokens = [model.tokenizer.eos_id if model.tokenizer is not None else DEFAULT_EOS]
    stop = np.asarray(list(stop_tokens), np.int64).reshape(-1)
    if stop.size and (stop.min() < 0 or stop.max() >= config.vocab_size):
        raise ValueError(f"stop token out of range [0, {config.vocab_size}): {stop_tokens!r}")
    stop = np.pad(stop, (0, bucket(stop.size, 4) - stop.size), constant_values=-1).astype(np.int32)
    t = bucket(int(lengths.max()))
    tokens = np.zeros((n, t), np.int32)
    for b, p in enumerate(ids):
        tokens[b, :len(p)] = p
    out_len = bucket(int(max_new.max()))
    static = Static(cache_len=min(t + out_len, config.max_seq_len), out_len=out_len,
                    prefill_chunk=int(prefill_chunk) if prefill_chunk and prefill_chunk < t else None,
                    attention=attention, kv_dtype=kv_dtype, mesh=mesh_of(model.params))
    params = SamplingParams(temperature, top_k, top_p, min_p, rep_pen, presence, frequency)
    return _Batch(tokens, lengths, params, seeds.astype(np.uint32), stop, max_new, static)


def _rows(state: DecodeState, logprobs: bool):
    n_new = np.asarray(state.n_new)
    tokens = [row[:k].tolist() for row, k in zip(np.asarray(state.tokens), n_new)]
    if not logprobs:
        return tokens
    return tokens, [row[:k].tolist() for row, k in zip(np.asarray(state.logprobs), n_new)]


def generate(model: Model, prompts, *, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
             repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, stop_tokens=None,
             seed=0, logprobs: bool = False, prefill_chunk=DEFAULT_PREFILL_CHUNK, attention="auto",
             kv_dtype=None):
    """Generate continuations of a batch of prompts.

    Args:
      model: a Model (config, params, tokenizer).
      prompts: token-id lists, or strings (need `model.tokenizer`; BOS is added).
      max_new_tokens: scalar or per prompt, >= 1.
      temperature, top_k, top_p, min_p, seed: scalars or one value per prompt. temperature 0 is
        greedy; top_k 0, top_p 1 and min_p 0 disable their filters.
      repetition_penalty (> 0; 1 disables), presence_penalty, frequency_penalty ([-2, 2]; 0
        disables): scalars or one value per prompt (see `apply_penalties`).
      stop_tokens: token ids that end a row (included in its output); None for EOS.
      logprobs: also return each chosen token's log-probability under the raw logits (before
        penalties and filters).
      prefill_chunk: prompt tokens per prefill step for prompts longer than it; None or 0 for the
        whole prompt at once.
      attention: "auto", "materialized", "blockwise", "cudnn" or "splash" (mixtral_jax.attention).
      kv_dtype: KV cache dtype, "int8" for the quantized cache (mixtral_jax.kvcache); None for the
        parameters' dtype.
    Returns:
      Per prompt, its new token ids (ending at and including the first stop token); with
      `logprobs=True`, `(tokens, logprobs)`.
    """
    b = prepare(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                stop_tokens=stop_tokens, seed=seed, prefill_chunk=prefill_chunk, attention=attention,
                kv_dtype=kv_dtype)
    state = _generate_jit(model.config, model.params, b.tokens, b.lengths, b.params, b.seeds, b.stop,
                          b.max_new, static=b.static)
    return _rows(state, logprobs)


def generate_stream(model: Model, prompts, *, logprobs: bool = False, **kwargs) -> Iterator[list]:
    """Like `generate` (the same keyword arguments), yielding after each step a list with each row's
    new token, or None for rows that have already stopped (with `logprobs=True`, `(token, logprob)`
    pairs). Driven by the same prefill and decode step as `generate`, with the cache donated between
    steps. Invalid arguments raise ValueError on the first `next()`."""
    b = prepare(model, prompts, **kwargs)
    args = (b.params, b.seeds, b.stop, b.max_new)
    state = _prefill_jit(model.config, model.params, b.tokens, b.lengths, *args, static=b.static)
    prev_done = np.zeros(len(b.lengths), bool)
    while True:
        last, done, step = np.asarray(state.last), np.asarray(state.done), int(state.step)
        lp = np.asarray(state.logprobs[:, min(step - 1, b.static.out_len - 1)]) if logprobs else None
        yield [None if prev_done[r] else ((int(last[r]), float(lp[r])) if logprobs else int(last[r]))
               for r in range(len(last))]
        if done.all():
            return
        prev_done = done
        state = _step_jit(model.config, model.params, state, *args, static=b.static)
