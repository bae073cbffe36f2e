"""Tokenizer: encode/decode round trips and chat encoding identical to mistral-common's v1."""

import itertools

import pytest

from mixtral_jax import Tokenizer

CONVERSATIONS = {
    "system prompt": [{"role": "system", "content": "You are a terse assistant."},
                      {"role": "user", "content": "Name a prime."}],
    "multi-turn": [{"role": "user", "content": "Hello"},
                   {"role": "assistant", "content": "Hi! How can I help?"},
                   {"role": "user", "content": "Tell me a joke."},
                   {"role": "assistant", "content": "Why did the chicken cross the road?"},
                   {"role": "user", "content": "Why?"}],
    "non-ASCII": [{"role": "user", "content": "Ça va? 東京は晴れ 🌞 — naïve café"}],
    "spaces": [{"role": "user", "content": "  leading and trailing  "},
               {"role": "assistant", "content": " spaced answer "},
               {"role": "user", "content": "\tend "}],
    "newlines": [{"role": "system", "content": "Line one.\nLine two."},
                 {"role": "user", "content": "a\n\nb\n"},
                 {"role": "assistant", "content": "x\ny"},
                 {"role": "user", "content": "\n"}],
    "merged users": [{"role": "user", "content": "first"}, {"role": "user", "content": "second"}],
    "system in the middle": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                             {"role": "user", "content": "q2"}, {"role": "system", "content": "Be kind"},
                             {"role": "user", "content": "q3"}],
}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def mistral_common_encoder(finetuning: bool = False):
    """mistral-common's v1 encoding (in its finetuning validation mode if asked): a function giving a
    conversation's token ids, or None when mistral-common rejects it."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import MistralRequestValidator, ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    mt = MistralTokenizer.v1()
    if finetuning:
        mt = MistralTokenizer(mt.instruct_tokenizer, MistralRequestValidator(ValidationMode.finetuning),
                              mt._instruct_request_normalizer)
    classes = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}

    def encode(messages):
        try:
            request = ChatCompletionRequest(messages=[classes[m["role"]](content=m["content"]) for m in messages])
            return mt.encode_chat_completion(request).tokens
        except Exception:  # noqa: BLE001 - any rejection counts as "invalid"
            return None
    return encode


@pytest.fixture(scope="module")
def reference():
    return mistral_common_encoder()


def test_special_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_encode_chat_equals_mistral_common(tok, reference, name):
    expected = reference(CONVERSATIONS[name])
    assert expected is not None
    assert tok.encode_chat(CONVERSATIONS[name]) == expected


def test_valid_exactly_when_mistral_common_accepts(tok, reference):
    """Every role sequence up to length 4, with empty and non-empty contents."""
    checked = rejected = 0
    for n in range(1, 5):
        for roles in itertools.product(["system", "user", "assistant"], repeat=n):
            for empties in itertools.product([False, True], repeat=n):
                if sum(empties) > 1:
                    continue
                msgs = [{"role": r, "content": "" if e else f"{r} {i}"}
                        for i, (r, e) in enumerate(zip(roles, empties))]
                expected = reference(msgs)
                if expected is None:
                    rejected += 1
                    with pytest.raises(ValueError):
                        tok.encode_chat(msgs)
                else:
                    assert tok.encode_chat(msgs) == expected, msgs
                checked += 1
    assert checked > 300 and 0 < rejected < checked


@pytest.fixture(scope="module")
def finetuning_reference():
    return mistral_common_encoder(finetuning=True)


def _answers_only(tok, messages, ids, mask):
    """The masked tokens are exactly each answer's encoding followed by EOS, in order (consecutive
    assistant messages are one answer, joined by a blank line)."""
    texts = []
    for prev, m in zip([None] + list(messages), messages):
        if m["role"] == "assistant":
            if prev is not None and prev["role"] == "assistant":
                texts[-1] += "\n\n" + m["content"]
            else:
                texts.append(m["content"])
    answers = [i for text in texts for i in tok.encode(text, bos=False) + [tok.eos_id]]
    return [i for i, keep in zip(ids, mask) if keep] == answers and ids[-1] == tok.eos_id and mask[-1] == 1


TRAINING_CONVERSATIONS = {
    "single": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}],
    "system + multi-turn": [{"role": "system", "content": "You are terse."},
                            {"role": "user", "content": "Hello"},
                            {"role": "assistant", "content": "Hi! How can I help?"},
                            {"role": "user", "content": "Tell me a joke."},
                            {"role": "assistant", "content": "Why did the chicken cross the road?"}],
    "non-ASCII, newlines": [{"role": "user", "content": "Ça va?\n東京"},
                            {"role": "assistant", "content": "Oui 🌞\nx\n"}],
    "spaces": [{"role": "user", "content": "  q "}, {"role": "assistant", "content": " spaced answer "}],
}


@pytest.mark.parametrize("name", list(TRAINING_CONVERSATIONS))
def test_encode_chat_for_training_equals_mistral_common(tok, finetuning_reference, name):
    messages = TRAINING_CONVERSATIONS[name]
    ids, mask = tok.encode_chat_for_training(messages)
    assert ids == finetuning_reference(messages)
    assert len(mask) == len(ids)
    assert _answers_only(tok, messages, ids, mask)


def test_encode_chat_for_training_accepts_exactly_what_mistral_common_does(tok, finetuning_reference):
    """Every role sequence up to length 4: same ids when accepted, ValueError when rejected."""
    checked = rejected = 0
    for n in range(1, 5):
        for roles in itertools.product(["system", "user", "assistant"], repeat=n):
            msgs = [{"role": r, "content": f"{r} {i}"} for i, r in enumerate(roles)]
            expected = finetuning_reference(msgs)
            if expected is None:
                rejected += 1
                with pytest.raises(ValueError):
                    tok.encode_chat_for_training(msgs)
            else:
                ids, mask = tok.encode_chat_for_training(msgs)
                assert ids == expected, msgs
                assert _answers_only(tok, msgs, ids, mask), msgs
            checked += 1
    assert checked > 100 and 0 < rejected < checked


@pytest.mark.parametrize("bad", [[], "hello", [{"role": "robot", "content": "x"}],
                                 [{"role": "user"}], [{"role": "user", "content": 3}]])
def test_malformed_conversations_raise(tok, bad):
    with pytest.raises(ValueError):
        tok.encode_chat(bad)


@pytest.mark.parametrize("text", ["Héllo wörld, ça va? 😀👍🏽", "  two leading spaces", "tabs\tand\nnewlines\n",
                                  "日本語のテキスト", "ünïcödé àccents — dash"])
def test_decode_inverts_encode(tok, text):
    ids = tok.encode(text, bos=False)
    assert tok.decode(ids) == text
    assert tok.encode(text) == [1] + ids and tok.encode(text, eos=True)[-1] == 2


def test_pieces_and_ids_map_both_ways(tok):
    ids = tok.encode("def self", bos=False)
    pieces = [tok.id_to_piece(i) for i in ids]
    assert "\u2581self" in pieces
    assert [tok.piece_to_id(p) for p in pieces] == ids


def test_decode_rejects_out_of_range(tok):
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([5, 32000])


def test_bad_model_path(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        Tokenizer(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="SentencePiece"):
        Tokenizer(junk)
