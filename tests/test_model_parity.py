"""Whole-model parity against HF transformers' MixtralForCausalLM (float32, CPU)."""

import numpy as np
import pytest

import mixtral_jax as mj
from conftest import GQA, MQA, TOP1, WINDOW, hf_logits, hf_model
from tolerances import LOGITS_ATOL


@pytest.fixture(scope="module", params=[GQA, MQA, TOP1, WINDOW], ids=["gqa", "mqa", "top1", "window"])
def pair(request, tmp_path_factory):
    """(HF model, our Model loaded from the HF folder it saved, sharded into many files)."""
    config = request.param
    model = hf_model(config)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path, max_shard_size="20KB")
    assert len(list(path.glob("*.safetensors"))) > 3
    if config.sliding_window is None:
        return model, mj.load(path, dtype="float32")
    # A window is not Mixtral's own attention: loading says it will be honoured.
    with pytest.warns(UserWarning, match="sliding_window=.* is set, but Mixtral uses full causal attention"):
        return model, mj.load(path, dtype="float32")


def assert_logits_match(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=LOGITS_ATOL, rtol=0)
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_full_sequence(pair, rng):
    model, ours = pair
    tokens = rng.integers(0, ours.config.vocab_size, (2, 23))
    assert_logits_match(mj.forward(ours.config, ours.params, tokens), hf_logits(model, tokens))


def test_logits_are_not_trivial(pair, rng):
    """Guard against a test that cannot fail: logits vary a lot across positions and vocab."""
    _, ours = pair
    logits = np.asarray(mj.forward(ours.config, ours.params, rng.integers(0, 101, (1, 16))))
    assert logits.std() > 0.5 and len(set(logits.argmax(-1)[0])) > 3


def test_padded_batch_rows_match_each_row_alone(pair, rng):
    model, ours = pair
    lengths = [19, 1, 7, 12]
    tokens = rng.integers(0, ours.config.vocab_size, (len(lengths), max(lengths)))
    padded = tokens.copy()
    for b, n in enumerate(lengths):
        padded[b, n:] = 0
    logits = np.asarray(mj.forward(ours.config, ours.params, padded, lengths=np.array(lengths)))
    for b, n in enumerate(lengths):
        assert_logits_match(logits[b, :n], hf_logits(model, tokens[b:b + 1, :n])[0])


def test_router_logits_match_hf(pair, rng):
    import torch

    model, ours = pair
    tokens = rng.integers(0, ours.config.vocab_size, (2, 9))
    _, router = mj.forward(ours.config, ours.params, tokens, return_router_logits=True)
    with torch.inference_mode():
        ref = model(torch.as_tensor(tokens), output_router_logits=True).router_logits
    ref = np.stack([r.float().numpy().reshape(2, 9, -1) for r in ref])
    assert router.shape == (ours.config.n_layers, 2, 9, ours.config.n_experts)
    np.testing.assert_allclose(np.asarray(router), ref, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("strategy", ["dense", "gather", "einsum"])
def test_every_moe_strategy_gives_hf_logits(pair, rng, strategy):
    model, ours = pair
    tokens = rng.integers(0, ours.config.vocab_size, (2, 11))
    logits = mj.forward(ours.config, ours.params, tokens, moe_strategy=strategy, group_size=8)
    assert_logits_match(logits, hf_logits(model, tokens))
