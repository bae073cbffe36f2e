"""A continuous-batching engine: decode slots sharing one KV cache, requests joining and leaving
between steps.

Device side (jitted programs, all compiled by `start` before it returns):
- `step`: one token for every decoding slot and, when a prompt is being read, one chunk of it into
  its slot's row of the cache (the slot index is traced, so one program serves every slot), in one
  pass through the decoder: the chunk's and the slots' tokens share each layer's MoE, so the expert
  weights (most of the bytes a step reads) are read once for both. At a prompt's last chunk its
  first token is sampled and the slot starts decoding. The last pieces of up to four prompts
  (at most `PACK_CHUNK` tokens each) can share one step, each in its own row of the chunk: short
  prompts arriving together (a burst of clients) start after one step, not one step each. One
  program per chunk size (powers of two from 16 up to `prefill_chunk`), two for packs (2 and 4
  pieces of `PACK_CHUNK`; a pack of three carries a padding piece whose slot index is out of range,
  so every write of it is dropped) and, without a chunk, one over every slot and one each over 1,
  2, 4, ... rows below the slot count, for steps where only that many slots decode (each row costs
  its share of a step whether its slot decodes or not: one stream alone decodes ~1.4x faster).
  Idle slots in a step compute but write nothing (their new length is 0), so their cache rows and
  lengths stay as they are.
- `release`: a slot stops decoding (stop string found on the host, or its client went away).

Host side, one thread owns every JAX call: each iteration it drops cancelled requests, admits
waiting requests into free slots (first come, first served), dispatches one step (with a chunk of
the request with the fewest prompt tokens left: running streams keep flowing while a long prompt
is read, and a short prompt does not wait for it; or, when several prompts have at most
`PACK_CHUNK` tokens left, all of them, up to four), and hands the previous step's tokens to their
requests (so the device computes while the host works). Steps with a prompt chunk are the
exception: one starts on an idle device and is waited for before the next is dispatched, so a
prompt arriving while it runs joins the very next step rather than queueing behind another long
step already dispatched (its worst wait is one chunk step, not two). Each request detokenizes
its token in the context of its prompt, looks for stop strings and calls its `on_event` callback
(from the engine thread: an asyncio server bridges with `loop.call_soon_threadsafe`).

Sampling matches `mixtral_jax.generate` row for row: the same penalties and filters, and a row's
random stream is its seed folded with its own token count, so a request's tokens do not depend on
what shares the batch, and equal `generate`'s for the same prompt, parameters and seed.

Multi-host (parameters on a mesh spanning processes): process 0 schedules; before each device call
it broadcasts the call and its arguments (`jax.experimental.multihost_utils.broadcast_one_to_all`,
fixed-size arrays), and every other process runs `follow()`, making the same calls in the same
order. While idle, process 0 sends a no-op every few seconds. The cache lives on the mesh; what a
step returns is replicated, so process 0 reads it.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ..attention import DEFAULT_BLOCK
from ..detokenize import IncrementalText
from ..kvcache import init_cache
from ..model import Model, Segment, decoder_segments, lm_head
from ..sampler import DEFAULT_EOS, SamplingParams, apply_penalties, bucket, sample
from ..sharding import constrain, mesh_of, sharding_for

log = logging.getLogger(__name__)

TOP_LOGPROBS = 20  # alternatives computed every step (OpenAI allows up to 20)
MIN_CHUNK = 16
PAD_LIMIT = 64  # padding tokens a prompt's last chunk may carry rather than take one more step
PACK_CHUNK = 64  # prompts with at most this many tokens left may share a step, each padded to it
PACK_SIZES = (2, 4)  # pieces in a shared step (three take the program for four)
HEARTBEAT_S = 5.0  # multi-host: an idle process 0 tells the others it is alive this often
OPS = ("noop", "prefill", "decode", "release", "stop")


@flax.struct.dataclass
class Slots:
    """Everything a decode step reads and writes, one row per slot."""
    cache: Any                 # KV cache with batch = slots
    last: jax.Array            # [N] int32 the token fed to the next step
    active: jax.Array          # [N] bool decoding
    n_new: jax.Array           # [N] int32 tokens generated
    max_new: jax.Array         # [N] int32 token budget
    seeds: jax.Array           # [N] uint32
    params: SamplingParams     # [N] each
    counts: jax.Array          # [N, V] int32 generated-token counts (penalties)
    in_prompt: jax.Array       # [N, V] bool (repetition penalty)


@flax.struct.dataclass
class StepOut:
    """Per slot, what a step produced (host-visible)."""
    token: jax.Array           # [N] int32
    live: jax.Array            # [N] bool: a token was produced for this slot
    done: jax.Array            # [N] bool: the slot stopped (stop token or budget)
    logprob: jax.Array         # [N] float32, under the raw logits
    top_ids: jax.Array         # [N, TOP_LOGPROBS] int32
    top_logprobs: jax.Array    # [N, TOP_LOGPROBS] float32
    routing: jax.Array         # [N, L, top_k] int32 experts at the position that produced the token


def _empty_slots(config, n: int, max_len: int, kv_dtype) -> Slots:
    z = lambda dt: jnp.zeros((n,), dt)  # noqa: E731
    params = SamplingParams(z(jnp.float32), z(jnp.int32), jnp.ones((n,), jnp.float32), z(jnp.float32),
                            jnp.ones((n,), jnp.float32), z(jnp.float32), z(jnp.float32))
    return Slots(cache=init_cache(config, n, max_len, dtype=kv_dtype), last=z(jnp.int32), active=z(bool),
                 n_new=z(jnp.int32), max_new=z(jnp.int32), seeds=z(jnp.uint32), params=params,
                 counts=jnp.zeros((n, config.vocab_size), jnp.int32),
                 in_prompt=jnp.zeros((n, config.vocab_size), bool))


def _emit(logits, chosen, router_logits, top_k: int):
    """logprob of `chosen`, the top alternatives and the experts, for rows of raw logits [B, V]."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp, TOP_LOGPROBS)
    routing = jax.lax.top_k(router_logits, top_k)[1].astype(jnp.int32)            # [L, B, X]
    return (jnp.take_along_axis(logp, chosen[:, None], axis=-1)[:, 0], top_ids.astype(jnp.int32), top_lp,
            routing.transpose(1, 0, 2))


def _replicated(out: "StepOut", mesh) -> "StepOut":
    """Every process holds all of a step's outputs (process 0 reads them)."""
    return jax.tree.map(lambda a: constrain(a, (None,) * a.ndim, mesh), out)


class Chunk(NamedTuple):
    """P pieces of prompts read in a step, one request each (device arrays; slot indices traced).
    A padding piece has slot N (out of range: its writes are dropped) and no valid tokens."""
    slot: jax.Array            # [P] int32
    tokens: jax.Array          # [P, C] int32, padded
    n_valid: jax.Array         # [P] int32 valid tokens
    start: jax.Array           # [P] int32 prompt position of tokens[p, 0]
    request: SamplingParams    # [P] each
    seed: jax.Array            # [P] uint32
    max_new: jax.Array         # [P] int32 token budget; 0 for a piece that is not its prompt's last

    def piece(self, p: int) -> "Chunk":
        """Piece p: scalars, and [1] sampling settings and seed."""
        one = lambda a: a[p:p + 1]  # noqa: E731
        return Chunk(self.slot[p], self.tokens[p], self.n_valid[p], self.start[p], jax.tree.map(one, self.request),
                     one(self.seed), self.max_new[p])


def _step(config, params, slots: Slots, stop, chunk: Chunk | None = None, rows=None, *, attention: str, mesh=None):
    """One token for every decoding slot and, with `chunk`, its pieces of prompts, each into its
    slot's cache row, in one pass through the decoder (the expert weights, most of a step's bytes,
    are read once for all). A prompt's last piece samples its first token and starts the slot.

    `rows` ([R] int32, R < N; padded with N, out of range): decode only those slots (a step without
    a chunk when few slots decode). Every row of a step costs its share of the dense weights'
    matrix-vector products, the logits and the sampling, whether its slot decodes or not.

    Returns:
      (slots, StepOut for the N slots (rows not decoded: not live), StepOut for the chunk's P
      pieces or None).
    """
    n_slots = slots.last.shape[0]
    if rows is None:
        get, put = (lambda a: a), (lambda a, v: v)
        live = slots.active
    else:
        get = lambda a: a[rows]  # noqa: E731  (out of range: clamped, and not live)
        put = lambda a, v: a.at[rows].set(v, mode="drop")  # noqa: E731
        live = slots.active[rows] & (rows < n_slots)
    cache = slots.cache
    last, seeds, n_new, counts = get(slots.last), get(slots.seeds), get(slots.n_new), get(slots.counts)
    segments = [Segment(last[:, None], live.astype(jnp.int32), rows)]
    if chunk is not None:
        # Straight into the slot's row (`rows`): copying the row out and back cost more, at a 32k
        # context, than a short prompt's whole prefill.
        cache = dict(cache, lengths=cache["lengths"].at[chunk.slot].set(chunk.start, mode="drop"))
        segments.append(Segment(chunk.tokens, chunk.n_valid, chunk.slot))
    hidden, cache, router_logits, _ = decoder_segments(config, params, segments, cache, attention=attention,
                                                       mesh=mesh)
    logits = lm_head(params, hidden[0][:, 0], mesh)                                   # [R, V]
    keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seeds, n_new)
    # Idle slots keep their last request's settings; counted as greedy, a sampled request that has
    # left does not make every later step sort the vocabulary (`sample` skips it when all are greedy).
    p = jax.tree.map(get, slots.params)
    p = p.replace(temperature=jnp.where(live, p.temperature, 0.0))
    token = sample(apply_penalties(logits, p, counts, get(slots.in_prompt)), p, keys)
    lp, top_ids, top_lp, routing = _emit(logits, token, router_logits[0][:, :, 0], config.top_k)
    n_new = n_new + live
    done = live & (jnp.isin(token, stop) | (n_new >= get(slots.max_new)))
    counts = counts.at[jnp.arange(token.shape[0]), token].add(live.astype(jnp.int32))
    out = StepOut(token=token, live=live, done=done, logprob=lp, top_ids=top_ids, top_logprobs=top_lp,
                  routing=routing)
    new = slots.replace(cache=cache, last=put(slots.last, jnp.where(live, token, last)),
                        active=put(slots.active, live & ~done), n_new=put(slots.n_new, n_new),
                        counts=put(slots.counts, counts))
    if rows is not None:
        out = jax.tree.map(lambda a: put(jnp.zeros((n_slots, *a.shape[1:]), a.dtype), a), out)
    out = _replicated(out, mesh)
    if chunk is None:
        return new, out, None
    firsts = []
    for p in range(chunk.tokens.shape[0]):
        new, first = _start(config, params, new, chunk.piece(p), hidden[1][p], router_logits[1][:, p], stop, mesh)
        firsts.append(first)
    return new, out, _replicated(jax.tree.map(lambda *rows: jnp.concatenate(rows), *firsts), mesh)


def _start(config, params, slots: Slots, chunk: Chunk, hidden, router_logits, stop, mesh):
    """After one piece of a prompt (hidden [C, D], router logits [L, C, E]): the prompt's tokens
    marked for the repetition penalty and, at its last piece, the first token sampled and the slot
    started. Writes at an out-of-range slot (a padding piece) are dropped."""
    vocab, slot = config.vocab_size, chunk.slot
    ids = jnp.where(jnp.arange(chunk.tokens.shape[0]) < chunk.n_valid, chunk.tokens, vocab)
    prompt_row = jnp.where(chunk.start == 0, False, slots.in_prompt[slot]).at[ids].set(True, mode="drop")
    last = chunk.n_valid - 1
    logits = lm_head(params, hidden[last][None], mesh)                                # [1, V]
    key = jax.random.fold_in(jax.random.key(chunk.seed[0]), 0)[None]
    counts0 = jnp.zeros((1, vocab), jnp.int32)
    token = sample(apply_penalties(logits, chunk.request, counts0, prompt_row[None]), chunk.request, key)
    lp, top_ids, top_lp, routing = _emit(logits, token, router_logits[:, last][:, None], config.top_k)
    final = chunk.max_new > 0
    done = jnp.isin(token, stop) | (chunk.max_new <= 1)
    put = lambda a, v: a.at[slot].set(jnp.where(final, v, a[slot]), mode="drop")  # noqa: E731
    new = slots.replace(
        in_prompt=slots.in_prompt.at[slot].set(prompt_row, mode="drop"), last=put(slots.last, token[0]),
        active=put(slots.active, final & ~done[0]), n_new=put(slots.n_new, 1), max_new=put(slots.max_new, chunk.max_new),
        seeds=put(slots.seeds, chunk.seed[0]),
        params=jax.tree.map(lambda a, v: put(a, v[0]), slots.params, chunk.request),
        counts=slots.counts.at[slot].set(jnp.where(final, jax.nn.one_hot(token[0], vocab, dtype=jnp.int32),
                                                   slots.counts[slot]), mode="drop"))
    return new, StepOut(token=token, live=final[None], done=(final & done[0])[None], logprob=lp, top_ids=top_ids,
                        top_logprobs=top_lp, routing=routing)


def _release(slots: Slots, slot):
    return slots.replace(active=slots.active.at[slot].set(False))


@dataclasses.dataclass
class Options:
    """One request's sampling settings (validated by `Engine.submit`)."""
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()           # stop strings (the text ends before the first one found)


@dataclasses.dataclass
class Event:
    """A request's progress, handed to its `on_event`: one per new token, then a final one."""
    text: str = ""                       # text that became final with this token (may be "")
    token: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    routing: list[list[int]] | None = None
    finish_reason: str | None = None     # set on the final event: "stop" | "length" | "cancelled" | "error"
    error: str | None = None


class Request:
    """A submitted request; `tokens`, `text` and `finish_reason` fill in as it runs."""

    def __init__(self, rid: int, prompt: list[int], options: Options, on_event: Callable[[Event], None],
                 tokenizer):
        self.id = rid
        self.prompt = prompt
        self.options = options
        self.on_event = on_event
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self._detok = IncrementalText(tokenizer, prompt) if tokenizer is not None else None
        self._held = ""                  # text held back while it could still start a stop string
        self._hold = max((len(s) for s in options.stop), default=1) - 1
        self.prefilled = 0               # prompt tokens already in the cache
        self.slot: int | None = None

    @property
    def unread(self) -> int:
        """Prompt tokens not in the cache yet."""
        return len(self.prompt) - self.prefilled

    def _accept(self, token: int, lp, top, routing) -> bool:
        """Record one token; emit its event; True when a stop string ended the request."""
        self.tokens.append(token)
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        piece = self._detok.add(token) if self._detok is not None else ""
        stopped, piece = self._release_text(piece, final=False)
        self.on_event(Event(text=piece, token=token, logprob=lp, top_logprobs=top, routing=routing))
        return stopped

    def _release_text(self, piece: str, final: bool) -> tuple[bool, str]:
        """Add `piece` to the held text; return (a stop string was found, text now safe to emit)."""
        held = self._held + piece
        for s in self.options.stop:
            at = held.find(s)
            if at >= 0:
                self._held = ""
                self.text += held[:at]
                return True, held[:at]
        keep = 0 if final else min(self._hold, len(held))
        out, self._held = held[:len(held) - keep], held[len(held) - keep:]
        self.text += out
        return False, out

    def _finish(self, reason: str, error: str | None = None) -> None:
        if self.finish_reason is not None:
            return
        tail = ""
        if reason in ("length", "stop") and self._detok is not None:
            stopped, tail = self._release_text(self._detok.flush(), final=True)
            reason = "stop" if stopped else reason
        self.finish_reason = reason
        self.on_event(Event(text=tail, finish_reason=reason, error=error))


class QueueFull(Exception):
    """The waiting queue is at `max_queue`."""


class _Calls:
    """Device calls as fixed-size arrays, broadcast from process 0 to the others (multi-host)."""

    HEAD = 2 + 7 * PACK_SIZES[-1]       # op, pieces, then 7 ints per piece; the pieces' tokens follow

    def __init__(self, chunk: int, slots: int):
        self.size = max(self.HEAD + max(chunk, PACK_SIZES[-1] * PACK_CHUNK), 2 + slots)

    def send(self, op: str, **kw) -> None:
        ints = np.zeros(self.size, np.int32)
        floats = np.zeros((PACK_SIZES[-1], 6), np.float32)
        ints[0] = OPS.index(op)
        if op == "prefill":
            ints[1] = len(kw["pieces"])
            at = self.HEAD
            for i, pc in enumerate(kw["pieces"]):
                o, tokens = pc["options"], pc["tokens"]
                ints[2 + 7 * i:9 + 7 * i] = (pc["slot"], pc["n_valid"], pc["start"],
                                             o.max_new_tokens if pc["final"] else 0, tokens.size, o.top_k,
                                             np.uint32(o.seed).view(np.int32))
                ints[at:at + tokens.size] = tokens
                at += tokens.size
                floats[i] = (o.temperature, o.top_p, o.min_p, o.repetition_penalty, o.presence_penalty,
                             o.frequency_penalty)
        elif op == "release":
            ints[1] = kw["slot"]
        elif op == "decode" and kw.get("rows") is not None:
            ints[1] = len(kw["rows"])
            ints[2:2 + len(kw["rows"])] = kw["rows"]
        self._broadcast(ints, floats)

    def receive(self) -> tuple[str, dict]:
        ints, floats = self._broadcast(np.zeros(self.size, np.int32), np.zeros((PACK_SIZES[-1], 6), np.float32))
        op = OPS[int(ints[0])]
        if op == "prefill":
            pieces, at = [], self.HEAD
            for i in range(int(ints[1])):
                slot, n_valid, start, max_new, size, top_k, seed = (int(v) for v in ints[2 + 7 * i:9 + 7 * i])
                t, tp, mp, rp, pp, fp = (float(v) for v in floats[i])
                options = Options(max_new_tokens=max(max_new, 1), temperature=t, top_k=top_k, top_p=tp, min_p=mp,
                                  repetition_penalty=rp, presence_penalty=pp, frequency_penalty=fp,
                                  seed=int(np.int32(seed).view(np.uint32)))
                pieces.append({"slot": slot, "tokens": ints[at:at + size].copy(), "n_valid": n_valid, "start": start,
                               "options": options, "final": max_new > 0})
                at += size
            return op, {"pieces": pieces}
        if op == "decode":
            return op, {"rows": ints[2:2 + ints[1]].copy() if ints[1] else None}
        return op, {"slot": int(ints[1])} if op == "release" else {}

    @staticmethod
    def _broadcast(ints, floats):
        from jax.experimental import multihost_utils

        out = multihost_utils.broadcast_one_to_all((ints, floats))
        return np.asarray(out[0]), np.asarray(out[1])


class Engine:
    """Continuous batching over `slots` decode slots (see the module docstring).

    Args:
      model: a loaded Model (its tokenizer detokenizes; without one, events carry no text). On a
        mesh spanning processes, every process builds the Engine alike: process 0 calls `start` and
        takes requests, the others call `follow`.
      slots: requests decoded together.
      max_seq_len: cache slots per request (prompt + new tokens); default the model's context.
      prefill_chunk: prompt tokens per prefill step (a power of two >= 16).
      max_queue: requests waiting for a slot before `submit` raises QueueFull.
      kv_dtype: KV cache dtype (None: the parameters').
      attention: the attention implementation.
      stop_tokens: token ids that end a request (default: the tokenizer's EOS).
    """

    def __init__(self, model: Model, *, slots: int = 8, max_seq_len: int | None = None, prefill_chunk: int = 256,
                 max_queue: int = 64, kv_dtype=None, attention: str = "auto", stop_tokens=None):
        config = model.config
        self.model, self.config = model, config
        self.n_slots = int(slots)
        self.max_seq_len = int(max_seq_len or config.max_seq_len)
        if self.n_slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if not 1 < self.max_seq_len <= config.max_seq_len:
            raise ValueError(f"max_seq_len must be in [2, {config.max_seq_len}], got {max_seq_len}")
        if prefill_chunk < MIN_CHUNK or prefill_chunk & (prefill_chunk - 1):
            raise ValueError(f"prefill_chunk must be a power of two >= {MIN_CHUNK}, got {prefill_chunk}")
        self.chunk = min(int(prefill_chunk), bucket(self.max_seq_len))
        self.max_queue = int(max_queue)
        self.kv_dtype = kv_dtype or model.params["embed"].dtype
        self.attention = attention
        self.mesh = mesh_of(model.params)
        self.leader = jax.process_index() == 0
        self._calls = _Calls(self.chunk, self.n_slots) if jax.process_count() > 1 else None
        if stop_tokens is None:
            stop_tokens = [model.tokenizer.eos_id if model.tokenizer is not None else DEFAULT_EOS]
        stop = np.asarray(list(stop_tokens), np.int32).reshape(-1)
        self.stop = np.pad(stop, (0, bucket(stop.size, 4) - stop.size), constant_values=-1)
        statics = dict(static_argnums=(0,), static_argnames=("attention", "mesh"), donate_argnums=(2,))
        self._step = jax.jit(_step, **statics)
        self._release = jax.jit(_release, donate_argnums=(0,))
        self._slots: Slots | None = None
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._cancelled: set[int] = set()
        self._running: dict[int, Request] = {}      # slot -> request (prefilling or decoding)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.ready = False

    # ---- public API ----

    def start(self) -> None:
        """Compile every program (warm-up) and start the engine thread (process 0)."""
        self._slots = self._empty_slots()
        self._warm_up()
        self._thread = threading.Thread(target=self._loop, name="mixtral-jax-engine", daemon=True)
        self._thread.start()
        self.ready = True

    def follow(self) -> None:
        """Processes other than 0: make process 0's device calls, in order, until it stops."""
        self._slots = self._empty_slots()
        while True:
            op, kw = self._calls.receive()
            if op == "stop":
                return
            self._device(op, **kw)

    def shutdown(self) -> None:
        """Stop the engine thread (and the followers); waiting and running requests end as "cancelled"."""
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            if self._calls is not None:
                self._calls.send("stop")
        for r in list(self._waiting) + list(self._running.values()):
            r._finish("cancelled")

    def submit(self, prompt: list[int], options: Options, on_event: Callable[[Event], None]) -> Request:
        """Queue a request (token ids, BOS included if wanted). ValueError for invalid values (checked
        now, on the host), QueueFull when `max_queue` requests are already waiting."""
        self._check(prompt, options)
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max-queue {self.max_queue})")
            req = Request(next(self._ids), list(prompt), options, on_event, self.model.tokenizer)
            self._waiting.append(req)
            self._lock.notify()
        return req

    def cancel(self, req: Request) -> None:
        """End a request (e.g. its client went away); its slot is freed before the next step."""
        with self._lock:
            self._cancelled.add(req.id)
            self._lock.notify()

    def generate(self, prompt: list[int], options: Options, timeout: float | None = None) -> Request:
        """Submit and wait: the finished request (`tokens`, `text`, `finish_reason`)."""
        done = threading.Event()
        req = self.submit(prompt, options, lambda e: done.set() if e.finish_reason else None)
        if not done.wait(timeout):
            self.cancel(req)
            raise TimeoutError(f"request {req.id} did not finish in {timeout} s")
        return req

    def counts(self) -> dict[str, int]:
        """{"waiting", "running", "slots_used"} now."""
        with self._lock:
            return {"waiting": len(self._waiting), "running": len(self._running), "slots_used": len(self._running)}

    # ---- checks ----

    def _check(self, prompt, options: Options) -> None:
        from ..sampler import prepare

        if not prompt:
            raise ValueError("the prompt is empty")
        total = len(prompt) + options.max_new_tokens
        if total > self.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({options.max_new_tokens}) = {total} "
                             f"exceeds the context ({self.max_seq_len})")
        prepare(self.model, [prompt], max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                top_k=options.top_k, top_p=options.top_p, min_p=options.min_p,
                repetition_penalty=options.repetition_penalty, presence_penalty=options.presence_penalty,
                frequency_penalty=options.frequency_penalty, seed=options.seed, prefill_chunk=None)

    # ---- engine thread ----

    def _chunks(self) -> list[int]:
        sizes, c = [], MIN_CHUNK
        while c <= self.chunk:
            sizes.append(c)
            c *= 2
        return sizes

    def _empty_slots(self) -> Slots:
        """Empty slots, committed where every later state lives (the outputs of the jitted steps): an
        uncommitted state would key the warm-up's programs differently from those serving calls. On a
        mesh the cache is split like `generate`'s (batch, cache sequence, KV heads by their logical
        axes) and the rest replicated."""
        # Rows a whole number of attention blocks long where the context allows: blockwise
        # attention would pad (copy) the whole cache on every call otherwise. Slots past
        # max_seq_len are never used.
        blocks = -(-self.max_seq_len // DEFAULT_BLOCK) * DEFAULT_BLOCK
        length = self.max_seq_len if self.max_seq_len <= DEFAULT_BLOCK else min(blocks, self.config.max_seq_len)
        slots = _empty_slots(self.config, self.n_slots, length, self.kv_dtype)
        if self.mesh is None:
            return jax.device_put(slots, next(iter(self.model.params["embed"].devices())))
        kv_axes = ("batch", "cache_sequence", "kv_heads", "head_dim")

        def place(path, a):
            in_cache = any(getattr(k, "key", None) in ("k", "v", "k_scale", "v_scale") for k in path)
            axes = kv_axes[:a.ndim] if in_cache else (None,) * a.ndim
            return jax.device_put(a, sharding_for(a.shape, axes, self.mesh))
        return jax.tree_util.tree_map_with_path(place, slots)

    def _row_buckets(self) -> list[int]:
        """Row counts of the steps without a chunk that decode only some slots (powers of two below
        the slot count; `_step`'s `rows`)."""
        return [1 << i for i in range((self.n_slots - 1).bit_length())]

    def _packs(self) -> tuple[int, ...]:
        """Pieces a shared step may hold (none when `prefill_chunk` is below PACK_CHUNK)."""
        return PACK_SIZES if self.chunk >= PACK_CHUNK else ()

    def _warm_up(self) -> None:
        """Compile a step with a chunk of every size, with each pack, without, and release, on slot 0
        (left empty; a pack's other pieces are padding)."""
        start = time.perf_counter()
        opts = Options(max_new_tokens=2, temperature=1.0, top_k=5)
        shapes = [(size, 1) for size in self._chunks()] + [(PACK_CHUNK, n) for n in self._packs()]
        for size, n in shapes:
            piece = dict(slot=0, tokens=np.ones(size, np.int32), n_valid=size, start=0, options=opts, final=True)
            self._call("prefill", pieces=[piece] + [self._padding(size)] * (n - 1))
        self._call("decode")
        for size in self._row_buckets():
            self._call("decode", rows=np.full(size, self.n_slots, np.int32))
        self._call("release", slot=0)
        jax.block_until_ready(self._slots.active)
        log.info("engine warm: %d step programs with a chunk, %d without, and release compiled in %.1f s",
                 len(shapes), 1 + len(self._row_buckets()), time.perf_counter() - start)

    def _padding(self, size: int) -> dict:
        """A piece that reads nothing: its slot is out of range, so all its writes are dropped."""
        return dict(slot=self.n_slots, tokens=np.zeros(size, np.int32), n_valid=0, start=0,
                    options=Options(max_new_tokens=1), final=False)

    def _call(self, op: str, **kw):
        """A device call made by process 0: broadcast to the followers first when multi-host."""
        if self._calls is not None:
            self._calls.send(op, **kw)
        return self._device(op, **kw)

    def _device(self, op: str, *, slot=0, pieces=(), rows=None):
        """Run one device call on this process; a step ("prefill": with pieces of prompts, "decode":
        without, of the slots `rows` or all) returns its outputs (the slots', the pieces' or None).
        Three pieces take the program for four, with a padding piece."""
        if op in ("prefill", "decode"):
            chunk = None
            if op == "prefill":
                pieces = list(pieces)
                if len(pieces) == 3:
                    pieces.append(self._padding(pieces[0]["tokens"].size))
                opts = [pc["options"] for pc in pieces]
                request = SamplingParams(*(np.asarray([getattr(o, name) for o in opts], dt) for name, dt in (
                    ("temperature", np.float32), ("top_k", np.int32), ("top_p", np.float32), ("min_p", np.float32),
                    ("repetition_penalty", np.float32), ("presence_penalty", np.float32),
                    ("frequency_penalty", np.float32))))
                ints = lambda key: np.asarray([pc[key] for pc in pieces], np.int32)  # noqa: E731
                chunk = Chunk(ints("slot"), np.stack([pc["tokens"] for pc in pieces]), ints("n_valid"), ints("start"),
                              request, np.asarray([o.seed for o in opts], np.uint32),
                              np.asarray([o.max_new_tokens if pc["final"] else 0 for o, pc in zip(opts, pieces)],
                                         np.int32))
            self._slots, out, first = self._step(self.config, self.model.params, self._slots, self.stop, chunk,
                                                 rows, attention=self.attention, mesh=self.mesh)
            return out, first
        if op == "release":
            self._slots = self._release(self._slots, np.int32(slot))
        return None

    def _loop(self) -> None:
        pending = None  # the last step dispatched, delivered after the next one is dispatched
        while True:
            with self._lock:
                idle = not (self._stop or self._waiting or self._running or self._cancelled)
            if idle and pending is not None:
                self._deliver(pending)
                pending = None
            with self._lock:
                while not (self._stop or self._waiting or self._running or self._cancelled):
                    if not self._lock.wait(HEARTBEAT_S) and self._calls is not None:
                        self._calls.send("noop")  # the followers are waiting in a collective
                if self._stop:
                    return
                cancelled, self._cancelled = self._cancelled, set()
                for req in [r for r in self._waiting if r.id in cancelled]:
                    self._waiting.remove(req)
                    req._finish("cancelled")
                free = [s for s in range(self.n_slots) if s not in self._running]
                while free and self._waiting:
                    req = self._waiting.popleft()
                    req.slot = free.pop(0)
                    self._running[req.slot] = req
            try:
                for slot, req in list(self._running.items()):
                    if req.id in cancelled:
                        self._end(slot, "cancelled", release=True)
                if pending is not None and self._reading():
                    # A step with a prompt chunk starts on an idle device and is waited for (below):
                    # a prompt arriving while a chunk step runs then joins the very next step
                    # instead of queueing behind one more long step already dispatched. The device
                    # waits for the host's few milliseconds, under 1% of a chunk step.
                    self._deliver(pending)
                    pending = None
                    continue
                step = self._dispatch()
                if pending is not None:
                    self._deliver(pending)
                pending = step
                if step is not None and step[2] is not None:  # it read a prompt chunk (its `first`)
                    self._deliver(step)
                    pending = None
            except Exception as e:  # noqa: BLE001 - every running request learns of it; the engine goes on
                log.exception("engine step failed")
                pending = None
                for slot in list(self._running):
                    self._end(slot, "error", f"{type(e).__name__}: {e}", release=True)

    def _reading(self) -> list[Request]:
        """The running requests whose prompt is not all in the cache yet."""
        return [r for r in self._running.values() if r.unread]

    def _dispatch(self):
        """Start a step (JAX dispatches asynchronously): every decoding slot, plus one prompt chunk,
        of the request with the fewest prompt tokens left to read (then the oldest), so a short
        prompt arriving behind a long one starts streaming after one chunk, not after the whole long
        prompt, and running streams get a token every step. When two or more prompts have at most
        PACK_CHUNK tokens left, the step reads them all instead (up to four, the shortest first).
        Returns what `_deliver` takes, or None when there is nothing to do.

        A decode-only step's tokens are read only after the next step has been dispatched, so the
        device does not wait for the host's detokenizing (`_loop` waits for steps with a chunk). A
        request the host ends meanwhile (a stop string, a cancel) may get one more token computed,
        which is dropped: its request has finished."""
        decoding = {s: r for s, r in self._running.items() if not r.unread}
        todo = sorted(self._reading(), key=lambda r: (r.unread, r.id))
        if not todo:
            return (decoding, *self._call("decode", rows=self._rows(decoding)), None) if decoding else None
        short = [r for r in todo if r.unread <= PACK_CHUNK][:max(self._packs(), default=1)]
        group = short if len(short) > 1 else todo[:1]
        size = PACK_CHUNK if len(group) > 1 else self._chunk_size(todo[0].unread)
        pieces = []
        for req in group:
            left = req.unread
            n = min(size, left)
            tokens = np.zeros(size, np.int32)
            tokens[:n] = req.prompt[req.prefilled:req.prefilled + n]
            pieces.append(dict(slot=req.slot, tokens=tokens, n_valid=n, start=req.prefilled, options=req.options,
                               final=n == left))
            req.prefilled += n
        out, first = self._call("prefill", pieces=pieces)
        return decoding, out, first, [req if pc["final"] else None for req, pc in zip(group, pieces)]

    def _rows(self, decoding: dict) -> np.ndarray | None:
        """The rows argument of a step decoding the slots `decoding` (None: the program for all):
        a 1-slot step of the small config took ~40 ms for 8 rows against ~25 ms for one."""
        size = next((b for b in self._row_buckets() if b >= len(decoding)), None)
        if size is None:
            return None
        rows = np.full(size, self.n_slots, np.int32)
        rows[:len(decoding)] = sorted(decoding)
        return rows

    def _chunk_size(self, left: int) -> int:
        """The compiled chunk size for the next piece of a prompt with `left` tokens unread: the
        whole rest padded up when that wastes at most PAD_LIMIT slots, else the largest size that
        fits. (On the small config a step with a chunk cost ~120 ms more than one without, about
        what 60 padding tokens cost: 300 tokens went fastest as 256 + 64, not 512 nor 256 + 32 + 16.)"""
        if left >= self.chunk:
            return self.chunk
        padded = max(MIN_CHUNK, bucket(left))
        if padded - left <= PAD_LIMIT:
            return padded
        return 1 << (left.bit_length() - 1)

    def _deliver(self, step) -> None:
        """Hand a step's tokens to their requests: the decoding slots', then the first tokens of the
        requests whose prompts the step finished."""
        decoding, out, first, started = step
        self._hand_out(decoding, jax.device_get(out), None)
        if first is not None:
            first = jax.device_get(first)
            for row, req in enumerate(started):
                if req is not None:
                    self._hand_out({req.slot: req}, first, row)

    def _hand_out(self, reqs: dict[int, Request], out: StepOut, row: int | None) -> None:
        """Each live row's token to its request (row `row` of `out` for all, else the slot's own);
        end the requests that finished."""
        for slot, req in reqs.items():
            r = slot if row is None else row
            if not out.live[r] or req.finish_reason is not None:
                continue
            top = [(int(i), float(lp)) for i, lp in zip(out.top_ids[r], out.top_logprobs[r])]
            if req._accept(int(out.token[r]), float(out.logprob[r]), top, out.routing[r].tolist()):
                self._end(slot, "stop", release=not out.done[r])        # a stop string
            elif out.done[r]:
                self._end(slot, "stop" if int(out.token[r]) in self.stop else "length")

    def _end(self, slot: int, reason: str, error: str | None = None, release: bool = False) -> None:
        """Finish the slot's request; `release` when the device may still be decoding the slot."""
        req = self._running.pop(slot)
        if release:
            self._call("release", slot=slot)
        req._finish(reason, error)
