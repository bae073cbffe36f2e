"""The OpenAI request and response shapes this server speaks, and their validation.

Requests are checked field by field here (not by FastAPI's models), so every problem becomes one
OpenAI-style error naming the field: `{"error": {"message", "type", "param", "code"}}`. Unknown
fields are ignored, as OpenAI does. Sampling fields a request leaves out take the checkpoint's
generation_config.json values, else OpenAI's defaults (temperature 1, top_p 1).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
import uuid
from typing import Any

from .engine import Options

MAX_STOP = 4
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's; chat defaults to the rest of the context


class APIError(Exception):
    """An error response: HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def unknown_model(model: str, served: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist; this server serves `{served}`", param="model",
                    code="model_not_found")


@dataclasses.dataclass
class Parsed:
    """A validated request: choice i is `prompts[i // n]` sampled with `options[i]` (OpenAI's order
    for a batch of completion prompts, each with its n choices)."""
    kind: str                          # "completion" | "chat"
    model: str
    prompts: list[list[int]]           # one, but for a completion request's batch of prompts
    options: list[Options]             # one per choice, seeds differing when sampling
    stream: bool
    include_usage: bool
    logprobs: int | None               # alternatives per token to report; None: no logprobs
    return_routing: bool
    echo: bool                         # completions: each choice's text starts with its prompt's

    def choice_prompts(self) -> list[list[int]]:
        """Each choice's prompt, in choice order."""
        n = len(self.options) // len(self.prompts)
        return [self.prompts[i // n] for i in range(len(self.options))]


def _number(body, name, lo=None, hi=None, *, lo_open=False, integer=False, default=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise invalid(f"{name} must be {'an integer' if integer else 'a number'}, got {v!r}", name)
    if not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        bounds = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
        raise invalid(f"{name} must lie in {bounds}, got {v!r}", name)
    return v


def _bool(body, name, default=False) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise invalid(f"{name} must be true or false, got {v!r}", name)
    return v


def _stop(body) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP:
        raise invalid(f"stop takes at most {MAX_STOP} strings, got {len(stops)}", "stop")
    return tuple(stops)


def parse(body: Any, kind: str, *, model_name: str, tokenizer, max_seq_len: int, defaults: dict) -> Parsed:
    """Validate a /v1/completions (kind "completion") or /v1/chat/completions ("chat") body.

    Args:
      body: the parsed JSON.
      model_name: the served model's name (another one is a 404).
      tokenizer: encodes prompts and conversations.
      max_seq_len: prompt + max_tokens must fit.
      defaults: `generate` keyword arguments from the checkpoint's generation config.
    Raises:
      APIError.
    """
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model is required (a string)", "model")
    if model != model_name:
        raise unknown_model(model, model_name)
    prompts = _completion_prompts(body, tokenizer) if kind == "completion" else [_chat_prompt(body, tokenizer)]
    longest = max(len(p) for p in prompts)
    room = max_seq_len - longest
    max_tokens = _number(body, "max_tokens", 1, integer=True)
    if kind == "chat":
        max_tokens = _number(body, "max_completion_tokens", 1, integer=True, default=max_tokens)
    if max_tokens is None:
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if kind == "completion" else room
    if max_tokens < 1 or longest + max_tokens > max_seq_len:
        which = "" if len(prompts) == 1 else f" {[len(p) for p in prompts].index(longest)}"
        raise invalid(f"the prompt{which} ({longest} tokens) plus max_tokens ({max_tokens}) exceeds the context "
                      f"({max_seq_len} tokens)", "max_tokens" if room > 0 else "messages" if kind == "chat" else "prompt")
    temperature = _number(body, "temperature", 0, 2, default=defaults.get("temperature", 1.0))
    top_p = _number(body, "top_p", 0, 1, lo_open=True, default=defaults.get("top_p", 1.0))
    top_k = _number(body, "top_k", 0, integer=True, default=defaults.get("top_k", 0))
    min_p = _number(body, "min_p", 0, 1, default=defaults.get("min_p", 0.0))
    presence = _number(body, "presence_penalty", -2, 2, default=defaults.get("presence_penalty", 0.0))
    frequency = _number(body, "frequency_penalty", -2, 2, default=defaults.get("frequency_penalty", 0.0))
    repetition = _number(body, "repetition_penalty", 0, lo_open=True, default=defaults.get("repetition_penalty", 1.0))
    seed = _number(body, "seed", integer=True)
    n = _number(body, "n", 1, integer=True, default=1)
    stream = _bool(body, "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise invalid("stream_options must be an object", "stream_options")
    include_usage = _bool(stream_options, "include_usage")
    logprobs = _logprobs(body, kind)
    echo = kind == "completion" and _bool(body, "echo")
    if echo and logprobs is not None:
        # Prompt tokens' logprobs (what scoring harnesses ask echo for) are not computed here.
        raise invalid("echo with logprobs is not supported (prompt token logprobs are not computed); "
                      "use `mixtral-jax score` to score text", "echo")
    base = seed if seed is not None else random.randrange(2**31)
    options = [Options(max_new_tokens=int(max_tokens), temperature=float(temperature), top_k=int(top_k),
                       top_p=float(top_p), min_p=float(min_p), repetition_penalty=float(repetition),
                       presence_penalty=float(presence), frequency_penalty=float(frequency),
                       seed=(base + i) % 2**32, stop=_stop(body)) for i in range(n * len(prompts))]
    return Parsed(kind, model, prompts, options, stream, include_usage, logprobs, _bool(body, "return_routing"),
                  echo)


def _completion_prompts(body, tokenizer) -> list[list[int]]:
    """`prompt` as OpenAI takes it: a string, a list of token ids, or a batch (a list) of either."""
    p = body.get("prompt")
    batch = isinstance(p, list) and bool(p) and all(isinstance(q, str) or (isinstance(q, list) and q) for q in p)
    prompts = p if batch else [p]
    out = []
    for i, q in enumerate(prompts):
        where = f"prompt {i}" if batch else "prompt"
        if isinstance(q, str):
            if not q:
                raise invalid(f"{where} is empty", "prompt")
            out.append(tokenizer.encode(q, bos=True))
        elif isinstance(q, list) and q and all(isinstance(t, int) and not isinstance(t, bool) for t in q):
            if min(q) < 0 or max(q) >= tokenizer.vocab_size:
                raise invalid(f"{where}: token ids must lie in [0, {tokenizer.vocab_size})", "prompt")
            out.append(list(q))
        else:
            raise invalid("prompt must be a non-empty string, a non-empty list of token ids, or a non-empty list "
                          "of either", "prompt")
    return out


def _chat_prompt(body, tokenizer) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise invalid(f"messages[{i}] must be an object with a role", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: the text ones, joined
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise invalid(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise invalid(f"messages[{i}].content must be a string", "messages")
        clean.append({"role": m["role"], "content": content})
    try:
        return tokenizer.encode_chat(clean)
    except ValueError as e:
        raise invalid(str(e), "messages") from None


def _logprobs(body, kind: str) -> int | None:
    if kind == "completion":
        v = _number(body, "logprobs", 0, 5, integer=True)
        return None if v is None else int(v)
    if not _bool(body, "logprobs"):
        if body.get("top_logprobs") is not None:
            _number(body, "top_logprobs", 0, 20, integer=True)
        return None
    return int(_number(body, "top_logprobs", 0, 20, integer=True, default=0))


# ---- responses ----

def new_id(kind: str) -> str:
    return ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


def piece_text(tokenizer, token: int) -> str:
    """A token's own text: its SentencePiece piece with the word marker as a space, byte pieces
    as the character of their byte where it is one (else the piece as written)."""
    piece = tokenizer.id_to_piece(token)
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
        b = int(piece[3:5], 16)
        return chr(b) if b < 0x80 else piece
    return piece.replace("\u2581", " ")


def piece_bytes(tokenizer, token: int) -> list[int]:
    piece = tokenizer.id_to_piece(token)
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
        return [int(piece[3:5], 16)]
    return list(piece.replace("\u2581", " ").encode("utf-8"))


def completion_logprobs(tokenizer, tokens, logprobs, tops, offsets, k: int) -> dict:
    """OpenAI's completions logprobs object for the given tokens."""
    return {"tokens": [piece_text(tokenizer, t) for t in tokens], "token_logprobs": list(logprobs),
            "top_logprobs": [{piece_text(tokenizer, i): lp for i, lp in top[:k]} for top in tops] if k else None,
            "text_offset": list(offsets)}


def chat_logprobs(tokenizer, tokens, logprobs, tops, k: int) -> dict:
    """OpenAI's chat logprobs object ({"content": [...]})."""
    return {"content": [
        {"token": piece_text(tokenizer, t), "logprob": lp, "bytes": piece_bytes(tokenizer, t),
         "top_logprobs": [{"token": piece_text(tokenizer, i), "logprob": v, "bytes": piece_bytes(tokenizer, i)}
                          for i, v in top[:k]]}
        for t, lp, top in zip(tokens, logprobs, tops)]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
