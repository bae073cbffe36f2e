"""Incremental detokenization: the text of new tokens decoded in the context of what came before.

Decoding token by token goes wrong twice with SentencePiece: a piece's leading space ("▁the") is
dropped when the piece is decoded alone, and a character split over byte-fallback tokens
("<0xF0><0x9F><0x99><0x82>") decodes to U+FFFD until its last byte arrives. So each step decodes a
short window that starts a few tokens before the unread ones (the prefix offset), subtracts the
window's already-emitted part (up to the read offset), and emits only when the text no longer ends
in U+FFFD. Both decodes start at the same token, so whatever SentencePiece does to a window's first
piece cancels out; the pieces emitted add up to `decode(context + new)[len(decode(context)):]`.
"""

from __future__ import annotations

from typing import Sequence

_CONTEXT = 5  # tokens of context kept before the unread ones


class IncrementalText:
    """Text of tokens appended after `context`, a piece at a time.

    Args:
      tokenizer: has `decode(ids) -> str`.
      context: token ids the new tokens follow (e.g. the prompt); may be empty.
    """

    def __init__(self, tokenizer, context: Sequence[int] = ()):
        self._decode = tokenizer.decode
        self.ids = list(context)
        self._prefix = max(0, len(self.ids) - _CONTEXT)
        self._read = len(self.ids)

    def add(self, token: int) -> str:
        """Append one token; returns the text that became final ("" while a character is incomplete)."""
        self.ids.append(int(token))
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end, as U+FFFD)."""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return after[len(before):]


def text_in_context(tokenizer, context: Sequence[int], new: Sequence[int]) -> str:
    """`decode(context + new)[len(decode(context)):]`: new text with its boundary spaces right."""
    return tokenizer.decode(list(context) + list(new))[len(tokenizer.decode(list(context))):]
