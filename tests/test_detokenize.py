"""Incremental detokenization: pieces emitted one token at a time add up to decoding in context."""

import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax.detokenize import IncrementalText, text_in_context

# 🦜 and ꙮ are not in the vocabulary: they arrive as byte-fallback pieces.
TEXTS = ["def fibonacci(n):\n    return n", "Ça va? 🦜 naïve café — 東京 ok", "  two  spaces\n\n\ttab",
         "x" * 40 + " 🦜🦜ꙮ " + "éé"]


@pytest.fixture(scope="module")
def tok():
    return mj.Tokenizer()


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("split", [0, 1, 4, 9])
def test_pieces_add_up_to_the_text_in_context(tok, text, split):
    ids = tok.encode(text, bos=True)
    split = min(split, len(ids) - 1)
    context, new = ids[:split], ids[split:]
    inc = IncrementalText(tok, context)
    pieces = [inc.add(t) for t in new]
    assert "".join(pieces) + inc.flush() == tok.decode(ids)[len(tok.decode(context)):] == text_in_context(tok, context, new)
    assert not any("\ufffd" in p for p in pieces)  # byte-fallback characters come out whole


def test_random_ids_and_an_unfinished_character(tok):
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(3, tok.vocab_size, 30).tolist()
        context, new = ids[:7], ids[7:]
        inc = IncrementalText(tok, context)
        assert "".join(inc.add(t) for t in new) + inc.flush() == text_in_context(tok, context, new)
    emoji = tok.encode("🦜", bos=False)[-4:]  # byte-fallback pieces <0xF0> <0x9F> <0xA6> <0x9C>
    inc = IncrementalText(tok, [1])
    assert [inc.add(t) for t in emoji[:2]] == ["", ""]
    assert inc.flush() == tok.decode(emoji[:2]) and "\ufffd" in tok.decode(emoji[:2])  # held back, then shown as is
