"""Log-likelihood of text: mean negative log-likelihood and perplexity, windowed past the context."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .model import Model, decoder, lm_head
from .sampler import bucket
from .sharding import constrain, mesh_of
from .tokenizer import Tokenizer

MIXTRAL_VOCAB = 32000


def _target_logprobs(config, params, tokens, lengths, mesh):
    """log p(tokens[:, t+1] | tokens[:, :t+1]) for every t: [B, T-1] float32, replicated."""
    hidden, _, _, _ = decoder(config, params, tokens, lengths, None, mesh=mesh)
    logp = jax.nn.log_softmax(lm_head(params, hidden[:, :-1]), axis=-1)            # [B, T-1, V]
    return constrain(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0], (None, None), mesh)


_target_logprobs_jit = jax.jit(_target_logprobs, static_argnames=("mesh",))


def score_tokens(model: Model, tokens: Sequence[int], *, window: int | None = None) -> dict:
    """Natural-log NLL of every token after the first, given all tokens before it.

    Sequences longer than `window` (default: the model's context) are scored in windows that
    overlap by half: each window scores only the tokens the previous one did not, so every
    token after the first window keeps at least half a window of context.

    Args:
      model: the model.
      tokens: token ids, usually starting with BOS (which is not scored).
      window: tokens per forward pass.
    Returns:
      {"tokens": n scored, "nll": mean NLL, "perplexity": exp(mean NLL)}.
    """
    config = model.config
    ids = np.asarray(tokens, np.int64).reshape(-1)
    window = config.max_seq_len if window is None else int(window)
    if ids.size < 2:
        raise ValueError("nothing to score: need at least one token after the first")
    if not 2 <= window <= config.max_seq_len:
        raise ValueError(f"window must be in [2, {config.max_seq_len}], got {window}")
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        raise ValueError(f"token id out of range [0, {config.vocab_size})")
    stride = max(1, window // 2)
    mesh = mesh_of(model.params)
    total, scored, end = 0.0, 1, 0  # `scored`: index of the next token to score
    while scored < ids.size:
        end = min(ids.size, window if end == 0 else end + stride)
        start = max(0, end - window)
        chunk = np.zeros((1, min(bucket(end - start), config.max_seq_len)), np.int32)
        chunk[0, :end - start] = ids[start:end]
        logp = np.asarray(_target_logprobs_jit(config, model.params, chunk,
                                               np.array([end - start], np.int32), mesh=mesh))[0]
        # logp[j] scores ids[start + j + 1]; keep the tokens from `scored` to `end`.
        total -= float(np.sum(logp[scored - start - 1:end - start - 1], dtype=np.float64))
        scored = end
    n = ids.size - 1
    return {"tokens": n, "nll": total / n, "perplexity": math.exp(total / n)}


def tokenizer_for(model: Model) -> Tokenizer:
    """The model's tokenizer, else the Mixtral v1 tokenizer when the vocabulary matches it."""
    if model.tokenizer is not None:
        return model.tokenizer
    if model.config.vocab_size == MIXTRAL_VOCAB:
        return Tokenizer()
    raise ValueError(f"checkpoint has no tokenizer.model and its vocabulary ({model.config.vocab_size}) "
                     f"is not Mixtral's ({MIXTRAL_VOCAB})")


def score_text(model: Model, text: str, *, window: int | None = None) -> dict:
    """`score_tokens` of BOS + the text's tokens."""
    return score_tokens(model, tokenizer_for(model).encode(text, bos=True), window=window)
