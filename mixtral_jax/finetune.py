"""Fine-tuning data: a JSONL file of conversations or texts -> fixed-shape batches with loss masks.

Each line is one example:
- `{"messages": [...]}`: a conversation ending with an assistant answer, encoded as mistral-common's
  v1 finetuning format (`Tokenizer.encode_chat_for_training`); the loss counts every answer's
  tokens and its EOS;
- `{"text": "..."}`: BOS, the text and EOS; the loss counts every token after BOS.
Other keys are ignored. An example longer than `seq_len + 1` tokens is cut there (counted).

Batches: one example per row, right-padded to `seq_len + 1` (no packing: examples never attend to
each other and nothing is cut at a row boundary; the cost is the padding, which the lengths keep out
of the loss). The order is a permutation per epoch drawn from (seed, epoch), so the rows of step s
are a pure function of s and a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import numpy as np

log = logging.getLogger(__name__)

SAMPLE = "sample"  # DATA name of the shipped chat sample (benchmarks/make_chat_sample.py writes it)


def sample_path() -> str:
    """The shipped chat sample: 212 short conversations (sums, capitals, one-line Python functions)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "finetune_data", "chat_sample.jsonl")


@dataclasses.dataclass(frozen=True)
class Examples:
    ids: tuple[np.ndarray, ...]     # int32 token ids per example
    masks: tuple[np.ndarray, ...]   # int32, 1 on the tokens the loss counts
    truncated: int                  # examples cut to seq_len + 1 tokens
    digest: str                     # sha256 of the file, so a resume can check its data

    def __len__(self) -> int:
        return len(self.ids)


def read_examples(path: str, tokenizer, seq_len: int) -> Examples:
    """Read and encode a fine-tuning JSONL file (format in the module docstring); "sample" is the
    shipped chat sample.

    Raises:
      ValueError: naming the file and line of the first bad line (invalid JSON, neither key, a
        conversation the finetuning format rejects, no token to learn), or an empty file.
      FileNotFoundError: no such file.
    """
    ids, masks, truncated = [], [], 0
    path = sample_path() if path == SAMPLE else path
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({e})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not ("messages" in obj or "text" in obj):
            raise ValueError(f'{where}: expected an object with "messages" or "text"')
        if "messages" in obj:
            try:
                example, mask = tokenizer.encode_chat_for_training(obj["messages"])
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        else:
            if not isinstance(obj["text"], str) or not obj["text"]:
                raise ValueError(f'{where}: "text" must be a non-empty string')
            example = tokenizer.encode(obj["text"], bos=True, eos=True)
            mask = [0] + [1] * (len(example) - 1)
        if len(example) > seq_len + 1:
            example, mask = example[:seq_len + 1], mask[:seq_len + 1]
            truncated += 1
        if not any(mask[1:]):
            raise ValueError(f"{where}: no answer token within --seq-len {seq_len}")
        ids.append(np.asarray(example, np.int32))
        masks.append(np.asarray(mask, np.int32))
    if not ids:
        raise ValueError(f"{path}: no examples")
    if truncated:
        log.warning("%s: %d of %d examples longer than %d tokens were cut", path, truncated, len(ids), seq_len + 1)
    return Examples(tuple(ids), tuple(masks), truncated, hashlib.sha256(raw).hexdigest())


def batch(examples: Examples, step: int, rows: int, seq_len: int, seed: int = 0):
    """The rows of `step`: (tokens [rows, seq_len+1] int32, lengths [rows] int32, loss mask
    [rows, seq_len+1] int32), examples taken in a per-epoch permutation of (seed, epoch)."""
    n = len(examples)
    tokens = np.zeros((rows, seq_len + 1), np.int32)
    mask = np.zeros((rows, seq_len + 1), np.int32)
    lengths = np.zeros((rows,), np.int32)
    orders: dict[int, np.ndarray] = {}  # a step's rows span at most a few epochs
    for r in range(rows):
        epoch, index = divmod(step * rows + r, n)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        example = orders[epoch][index]
        ids = examples.ids[example]
        tokens[r, :len(ids)], mask[r, :len(ids)], lengths[r] = ids, examples.masks[example], len(ids)
    return tokens, lengths, mask
