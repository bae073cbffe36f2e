"""SentencePiece tokenizer with Mixtral's v1 instruct chat format.

`encode_chat` reproduces mistral-common's v1 instruct encoding (the reference) token for token,
and accepts exactly the conversations it accepts:

- roles are "system", "user", "assistant"; a user may follow anything, an assistant may follow a
  user, a system message or an assistant, a system message may follow a user or a system message;
- a lone message must be a user or system message, and a longer conversation must not end with an
  assistant turn (the model is to answer); assistant turns must not be empty;
- consecutive messages of one role are merged with a blank line; all system messages are merged
  into a system prompt placed before the first user message; a conversation that does not start
  with a user turn gets an empty one first;
- encoding: `<s>`, then `[INST] {user} [/INST]` per user turn and `{assistant}</s>` per answer.

`encode_chat_for_training` encodes a conversation that ends with an answer (mistral-common's
finetuning mode) and marks the answers' tokens and EOS for the loss.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping, Sequence

import sentencepiece as spm

ROLES = ("system", "user", "assistant")
# Which roles may directly follow each role (mistral-common's validator).
_MAY_FOLLOW = {
    "system": {"user", "assistant", "system"},
    "user": {"assistant", "system", "user"},
    "assistant": {"assistant", "user"},
}
_JOIN = "\n\n"


def mixtral_v1_model_path() -> str:
    """Path of the Mixtral v1 SentencePiece model shipped inside the mistral-common wheel."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("mistral-common is not installed; it ships the Mixtral v1 tokenizer")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "tokenizer.model.v1")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: Mixtral v1 tokenizer not found in mistral-common")
    return path


class Tokenizer:
    """SentencePiece tokenizer.

    Args:
      path: a SentencePiece `.model` file; None for the Mixtral v1 model from mistral-common.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = os.fspath(path) if path is not None else mixtral_v1_model_path()
        if not os.path.isfile(self.path):
            raise ValueError(f"{self.path}: tokenizer model not found")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self.path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.path}: not a SentencePiece model ({e})") from None

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def id_to_piece(self, i: int) -> str:
        """The SentencePiece piece of id `i` (e.g. "\u2581self", "<0x0A>")."""
        return self._sp.IdToPiece(int(i))

    def piece_to_id(self, piece: str) -> int:
        """The id of a SentencePiece piece (the unknown id for a piece not in the vocabulary)."""
        return self._sp.PieceToId(piece)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`, with BOS first and EOS last when asked."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        ids = self._sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids; control tokens (BOS, EOS) decode to nothing."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} out of range [0, {self.vocab_size})")
        return self._sp.DecodeIds(ids)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Token ids of a conversation in the Mixtral [INST] format (see the module docstring).

        Args:
          messages: [{"role": "system"|"user"|"assistant", "content": str}, ...].
        Returns:
          Token ids starting with BOS, ending with the last user turn's `[/INST]`.
        Raises:
          ValueError: a conversation mistral-common's v1 tokenizer would reject.
        """
        return [i for ids, _ in self._chat_segments(_validate(messages, last="user")) for i in ids]

    def encode_chat_for_training(self, messages: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[int]]:
        """A conversation ending with an assistant answer, encoded for fine-tuning.

        The ids are mistral-common's v1 encoding in its finetuning validation mode (every answer,
        the last included, followed by `</s>`); the mask is 1 on every answer's tokens and its EOS,
        the tokens a fine-tuning loss counts.

        Args:
          messages: [{"role": ..., "content": str}, ...], the last one an assistant's.
        Returns:
          (ids, loss_mask), two lists of one length.
        Raises:
          ValueError: a conversation mistral-common's finetuning mode would reject.
        """
        ids: list[int] = []
        mask: list[int] = []
        for segment, is_answer in self._chat_segments(_validate(messages, last="assistant")):
            ids += segment
            mask += [int(is_answer)] * len(segment)
        return ids, mask

    def _chat_segments(self, messages) -> list[tuple[list[int], bool]]:
        """(ids, is an answer) pieces of a validated conversation, in order."""
        system = _JOIN.join(m["content"] for m in messages if m["role"] == "system" and m["content"])
        turns: list[list[Any]] = []  # [role, merged content]
        prev_role = None
        for m in messages:
            if m["role"] != "system":
                if m["role"] == prev_role:
                    if m["content"]:
                        turns[-1][1] = turns[-1][1] + _JOIN + m["content"] if turns[-1][1] else m["content"]
                else:
                    turns.append([m["role"], m["content"]])
            prev_role = m["role"]
        if not turns or turns[0][0] != "user":
            turns.insert(0, ["user", ""])
        segments = [([self.bos_id], False)]
        for i, (role, content) in enumerate(turns):
            if role == "user":
                if i == 0 and system:
                    content = system + _JOIN + content
                segments.append((self._sp.EncodeAsIds(f"[INST] {content} [/INST]"), False))
            else:
                segments.append((self._sp.EncodeAsIds(content) + [self.eos_id], True))
        return segments


def _validate(messages, last: str) -> list[Mapping[str, Any]]:
    """The checks of mistral-common's validator; `last`: the role the conversation must end with
    ("user" to be answered, "assistant" for fine-tuning)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role', 'content'} dicts")
    if not messages:
        raise ValueError("conversation is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} content must be a str")
        if m["role"] == "assistant" and not m["content"]:
            raise ValueError(f"message {i}: an assistant message must not be empty")
        if i and m["role"] not in _MAY_FOLLOW[messages[i - 1]["role"]]:
            raise ValueError(f"message {i}: role {m['role']!r} may not follow {messages[i - 1]['role']!r}")
    if last == "user" and messages[-1]["role"] == "assistant":
        raise ValueError("conversation ends with an assistant message; the last turn must be the user's")
    if len(messages) == 1 and messages[0]["role"] == "assistant":
        raise ValueError("a conversation must start with a user or system message")
    if last == "assistant" and messages[-1]["role"] != "assistant":
        raise ValueError(f"a training conversation must end with an assistant answer, not {messages[-1]['role']!r}")
    return list(messages)
