"""The Mixtral paper's long-context evaluations (§3.2): passkey retrieval and perplexity against
context length.

**Passkey retrieval** follows the protocol of Mohtashami & Jaggi ("Landmark Attention", the one the
paper cites), from its published code: a task line, filler text, a line stating a random key, more
filler, and the question, joined by newlines; BOS first, no chat template. Here the filler is sized
in tokens: the prompt comes within 1% of the target length (BOS counted), with the given fraction
(depth) of the filler before the key line. The model continues greedily for 10 tokens; an answer is
correct when the first integer in the continuation is the key.

**Perplexity against context length** scores the same tokens (those at positions at least the
largest context length) once per context length c, each token given exactly the c tokens before
it: one c-token excerpt per scored token (no BOS in front), run in batches, the last position's
distribution kept. It costs (scored tokens) x c tokens of prefill per context length. A sliding
window of c over the whole text in one pass would be cheaper but is not the same thing: through L
layers a position's receptive field reaches L x c tokens back.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .model import Model, decoder, lm_head

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
MAX_KEY = 50000
ANSWER_TOKENS = 10


def _filler_ids(tokenizer, n: int) -> list[int]:
    """The first n tokens of the filler repeated (sentences joined by spaces)."""
    per = len(tokenizer.encode(FILLER, bos=False))
    text = " ".join([FILLER] * (n // max(per, 1) + 2))
    return tokenizer.encode(text, bos=False)[:n]


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> list[int]:
    """Token ids (BOS first) of a passkey prompt of about `length` tokens (within 1%), with `depth`
    (0..1) of the filler before the key line.

    Args:
      tokenizer: has encode(text, bos) and decode(ids).
      length: target prompt length in tokens, BOS included.
      depth: share of the filler placed before the key line.
      key: the pass key (1..50000 in the protocol).
    Returns:
      The prompt's token ids.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")

    def build(n_filler: int) -> list[int]:
        filler = _filler_ids(tokenizer, n_filler)
        cut = round(depth * len(filler))
        lines = [TASK, tokenizer.decode(filler[:cut]), KEY_LINE.format(key=key),
                 tokenizer.decode(filler[cut:]), QUESTION]
        return tokenizer.encode("\n".join(lines), bos=True)

    fixed = len(build(0))
    if length <= fixed:
        raise ValueError(f"length {length} leaves no room for filler: the prompt without filler has "
                         f"{fixed} tokens")
    n = length - fixed
    ids = build(n)
    for _ in range(4):  # decoding and re-encoding the filler can merge a token or two at the joins
        if abs(len(ids) - length) <= length // 100:
            break
        n += length - len(ids)
        ids = build(n)
    return ids


def first_integer(text: str) -> int | None:
    """The first run of digits in `text` as an int, or None."""
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


def passkey(model: Model, lengths: Sequence[int], depths: Sequence[float], *, trials: int = 5, seed: int = 0,
            progress=None, **generate_kwargs) -> dict:
    """Passkey retrieval accuracy per (length, depth).

    Args:
      model: a Model with a tokenizer.
      lengths: prompt lengths in tokens; each at most the context minus the 10 answer tokens.
      depths: key positions as shares of the filler.
      trials: keys per (length, depth), drawn from 1..50000 with `seed`.
      progress: called with the number of prompts done after each batch, or None.
      generate_kwargs: passed to `generate` (attention, prefill_chunk, kv_dtype).
    Returns:
      {"lengths", "depths", "trials", "accuracy": [[share correct per depth] per length]}.
    """
    from .sampler import generate

    if model.tokenizer is None:
        raise ValueError("passkey needs a model with a tokenizer")
    limit = model.config.max_seq_len - ANSWER_TOKENS
    for n in lengths:
        if not 1 <= n <= limit:
            raise ValueError(f"length {n} out of range: the context ({model.config.max_seq_len}) minus "
                             f"{ANSWER_TOKENS} answer tokens allows at most {limit}")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    rng = np.random.default_rng(seed)
    accuracy = []
    for n in lengths:
        row = []
        for depth in depths:
            keys = [int(k) for k in rng.integers(1, MAX_KEY + 1, trials)]
            prompts = [passkey_prompt(model.tokenizer, n, depth, k) for k in keys]
            answers = generate(model, prompts, max_new_tokens=ANSWER_TOKENS, stop_tokens=[], **generate_kwargs)
            right = sum(first_integer(model.tokenizer.decode(a)) == k for a, k in zip(answers, keys))
            row.append(right / trials)
            if progress is not None:
                progress(trials)
        accuracy.append(row)
    return {"lengths": list(lengths), "depths": list(depths), "trials": trials, "accuracy": accuracy}


# Excerpts per forward pass: about this many tokens at once.
EXCERPT_TOKENS = 8192


def _next_logprob(config, params, windows, targets, attention: str):
    """log p(targets[b] | windows[b]) for excerpts windows [B, c]: [B] float32."""
    hidden, _, _, _ = decoder(config, params, windows, None, None, attention=attention)   # [B, c, D]
    logp = jax.nn.log_softmax(lm_head(params, hidden[:, -1]), axis=-1)                  # [B, V]
    return jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]


_next_logprob_jit = jax.jit(_next_logprob, static_argnums=(0,), static_argnames=("attention",))


def context_perplexity(model: Model, ids: Sequence[int], context_lengths: Sequence[int], *,
                       attention: str = "auto", progress=None) -> dict:
    """Perplexity of the same tokens as the context grows (see the module docstring).

    Args:
      model: the model.
      ids: the text's token ids (BOS first, as `score` encodes it).
      context_lengths: tokens of context per scored token; the tokens scored are those at positions
        >= the largest.
      attention: the attention implementation.
      progress: called with the number of tokens scored after each batch, or None.
    Returns:
      {"context_lengths", "perplexity" (one per context length), "tokens" (scored)}.
    """
    ids = np.asarray(ids, np.int32).reshape(-1)
    lengths = [int(c) for c in context_lengths]
    if not lengths or min(lengths) < 1:
        raise ValueError("context lengths must be integers >= 1")
    first = max(lengths)
    if ids.size <= first:
        raise ValueError(f"the text has {ids.size} tokens: it needs more than the largest context length "
                         f"({first}) to score any token")
    if first > model.config.max_seq_len:
        raise ValueError(f"context length {first} exceeds the model's context ({model.config.max_seq_len})")
    if ids.min() < 0 or ids.max() >= model.config.vocab_size:
        raise ValueError(f"token id out of range [0, {model.config.vocab_size})")
    scored = np.arange(first, ids.size)
    perplexity = []
    for c in lengths:
        rows = max(1, EXCERPT_TOKENS // c)
        total = 0.0
        for start in range(0, scored.size, rows):
            at = scored[start:start + rows]
            at = np.pad(at, (0, rows - at.size), mode="edge")                         # a fixed batch shape
            windows = ids[at[:, None] - c + np.arange(c)[None, :]]                    # [rows, c]
            logp = np.asarray(_next_logprob_jit(model.config, model.params, jnp.asarray(windows),
                                                jnp.asarray(ids[at]), attention=attention))
            n = min(rows, scored.size - start)
            total -= float(np.sum(logp[:n], dtype=np.float64))
            if progress is not None:
                progress(n)
        perplexity.append(math.exp(total / scored.size))
    return {"context_lengths": lengths, "perplexity": perplexity, "tokens": int(scored.size)}


def plot_passkey(result: dict, out) -> None:
    """PNG heatmap of passkey accuracy: length (rows) by depth (columns); `out` a path or binary file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    acc = np.asarray(result["accuracy"], np.float64)
    fig = Figure(figsize=(1.2 * len(result["depths"]) + 2.5, 0.5 * len(result["lengths"]) + 1.8),
                 layout="constrained")
    canvas = FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for (i, j), a in np.ndenumerate(acc):
        ax.text(j, i, f"{a:.0%}", ha="center", va="center", fontsize=8)
    ax.set(xticks=range(acc.shape[1]), xticklabels=[f"{d:g}" for d in result["depths"]],
           yticks=range(acc.shape[0]), yticklabels=[str(n) for n in result["lengths"]],
           xlabel="depth of the key in the filler", ylabel="prompt length (tokens)",
           title=f"passkey retrieval, {result['trials']} keys per cell")
    fig.colorbar(image, ax=ax, label="accuracy")
    canvas.print_png(out)


def plot_context(result: dict, out) -> None:
    """PNG of perplexity against context length (log-2 axis); `out` a path or binary file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5), layout="constrained")
    canvas = FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(result["context_lengths"], result["perplexity"], "o-")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="context length (tokens)", ylabel="perplexity",
           title=f"the same {result['tokens']} tokens, more context")
    canvas.print_png(out)
