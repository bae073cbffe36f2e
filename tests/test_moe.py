"""MoE layer: routing identities, every strategy vs the dense oracle and HF's MixtralSparseMoeBlock."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax import moe as moe_lib
from conftest import GQA, hf_model
from tolerances import GRAD_TOL, LAYER_ATOL, STRATEGY_ATOL


def layer_and_input(config, rng, n_tokens=37):
    params = mj.init_params(config, seed=1)["layers_0"]
    params = jax.tree.map(lambda a: a * 10.0, params)  # std 0.2: routing decisions matter
    x = jnp.asarray(rng.standard_normal((n_tokens, config.d_model)), jnp.float32)
    return params, x


def test_topk_softmax_equals_softmax_topk_renormalise(rng):
    logits = rng.standard_normal((500, 8)).astype(np.float32)
    logits[:50, 3] = logits[:50, 5]  # ties go to the lower index in both formulations
    w = jnp.asarray(rng.standard_normal((8, 8)), jnp.float32)
    x = jnp.asarray(logits) @ jnp.linalg.inv(w)
    routing = moe_lib.route(x, w, 2)
    probs = jax.nn.softmax(routing.logits, axis=-1)                      # HF: softmax over all,
    top_p, top_i = jax.lax.top_k(probs, 2)                               # top-2,
    renorm = top_p / top_p.sum(-1, keepdims=True)                        # renormalise
    np.testing.assert_array_equal(np.asarray(routing.experts), np.asarray(top_i))
    np.testing.assert_allclose(np.asarray(routing.weights), np.asarray(renorm), atol=1e-6)
    tied = np.asarray(routing.experts)[:50]
    assert np.all((tied != 5) | np.isin(3, tied))  # 5 never chosen over its tie 3


@pytest.mark.parametrize("strategy", ["gather", "einsum"])
@pytest.mark.parametrize("n_tokens", [1, 3, 37])
def test_strategy_equals_dense_oracle(rng, strategy, n_tokens):
    params, x = layer_and_input(GQA, rng, n_tokens)
    ref, ref_logits, _ = moe_lib.moe(x, params, top_k=2, strategy="dense")
    for group_size in (8, 512):
        y, logits, dropped = moe_lib.moe(x, params, top_k=2, strategy=strategy, group_size=group_size)
        np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=STRATEGY_ATOL, rtol=0)
        np.testing.assert_array_equal(np.asarray(logits), np.asarray(ref_logits))
        assert int(dropped) == 0


@pytest.mark.parametrize("strategy", ["dense", "gather", "einsum", "auto"])
def test_strategy_equals_hf_sparse_moe_block(rng, strategy):
    import torch

    model = hf_model(GQA)
    block = model.model.layers[0].mlp
    sd = {k: v.detach().numpy() for k, v in block.state_dict().items()}
    f = GQA.d_ff
    params = {
        "router": jnp.asarray(sd["gate.weight"].T),
        "w_gate": jnp.asarray(sd["experts.gate_up_proj"][:, :f].transpose(0, 2, 1)),
        "w_up": jnp.asarray(sd["experts.gate_up_proj"][:, f:].transpose(0, 2, 1)),
        "w_down": jnp.asarray(sd["experts.down_proj"].transpose(0, 2, 1)),
    }
    x = rng.standard_normal((1, 29, GQA.d_model)).astype(np.float32)
    with torch.inference_mode():
        ref = block(torch.as_tensor(x)).numpy()[0]
    y, _, _ = moe_lib.moe(jnp.asarray(x[0]), params, top_k=2, strategy=strategy)
    np.testing.assert_allclose(np.asarray(y), ref, atol=LAYER_ATOL, rtol=0)


def test_capacity_factor_drops_are_counted(rng):
    params, x = layer_and_input(GQA, rng, 64)
    group, cf = 16, 0.5
    capacity = moe_lib.einsum_capacity(group, 8, 2, cf)
    y, _, dropped = moe_lib.moe(x, params, top_k=2, strategy="einsum", group_size=group,
                                capacity_factor=cf)
    experts = np.asarray(moe_lib.route(x, params["router"], 2).experts).reshape(-1, group, 2)
    counts = np.stack([np.bincount(g.ravel(), minlength=8) for g in experts])  # [groups, E]
    # Each expert keeps min(count, C) of its assignments whatever the priority order.
    assert int(dropped) == int(np.maximum(counts - capacity, 0).sum()) > 0
    ref, _, _ = moe_lib.moe(x, params, top_k=2, strategy="dense")
    # A token whose experts were all under capacity in its group is computed exactly.
    safe = np.all(counts[np.arange(len(experts))[:, None, None], experts] <= capacity, axis=-1).ravel()
    assert safe.any() and not safe.all()
    np.testing.assert_allclose(np.asarray(y)[safe], np.asarray(ref)[safe], atol=STRATEGY_ATOL)
    assert not np.allclose(np.asarray(y)[~safe], np.asarray(ref)[~safe], atol=STRATEGY_ATOL)


def test_padding_tokens_take_no_capacity(rng):
    params, x = layer_and_input(GQA, rng, 32)
    valid = jnp.arange(32) < 20
    _, _, dropped_all = moe_lib.moe(x, params, top_k=2, strategy="einsum", group_size=32,
                                    capacity_factor=0.25)
    _, _, dropped_valid = moe_lib.moe(x, params, top_k=2, strategy="einsum", group_size=32,
                                      capacity_factor=0.25, valid=valid)
    assert int(dropped_valid) < int(dropped_all)


def test_forward_reports_dropped_tokens(rng, caplog):
    config = GQA
    params = jax.tree.map(lambda a: a * 10.0 if a.ndim > 1 else a, mj.init_params(config))
    tokens = rng.integers(0, config.vocab_size, (2, 40))
    with caplog.at_level("WARNING"):
        mj.forward(config, params, tokens, moe_strategy="einsum", capacity_factor=0.3)
    assert "dropped" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        mj.forward(config, params, tokens, moe_strategy="einsum")
    assert "dropped" not in caplog.text


def test_unknown_strategy_is_rejected(rng):
    with pytest.raises(ValueError, match="strategy"):
        mj.forward(GQA, mj.init_params(GQA), [[1, 2]], moe_strategy="magic")


@pytest.mark.parametrize("strategy", ["dense", "gather", "einsum", "sorted", "ragged", "blocked"])
@pytest.mark.parametrize("n_tokens", [1, 3, 37, 64])
def test_split_layout_and_sorted_equal_the_oracle(rng, strategy, n_tokens):
    """Per-expert (split) leaves give the same results as stacked ones, for every strategy."""
    params, x = layer_and_input(GQA, rng, n_tokens)
    ref, _, _ = moe_lib.moe(x, params, top_k=2, strategy="dense")
    split = mj.model.split_layer(params)
    assert moe_lib.is_split(split["w_gate"]) and len(split["w_gate"]) == 8
    for name in ("w_gate", "w_up", "w_down"):  # [out, in] matrices
        np.testing.assert_array_equal(np.asarray(split[name][5]), np.asarray(params[name][5]).T)
    for layer in (params, split):
        y, _, dropped = moe_lib.moe(x, layer, top_k=2, strategy=strategy, group_size=16)
        np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=STRATEGY_ATOL, rtol=0)
        assert int(dropped) == 0


def test_auto_choice_follows_layout_and_mesh():
    """Split (CPU) weights: sorted at every size; stacked: gather for decode-sized inputs."""
    assert moe_lib.choose_strategy(1, 8, 2, split=True) == "sorted"
    assert moe_lib.choose_strategy(512, 8, 2, split=True) == "sorted"
    assert moe_lib.choose_strategy(3, 8, 2) == "gather"
    assert moe_lib.choose_strategy(4, 8, 2) == "sorted"


def test_sorted_ignores_padding_tokens(rng):
    params, x = layer_and_input(GQA, rng, 40)
    valid = jnp.arange(40) < 25
    y, _, _ = moe_lib.moe(x, mj.model.split_layer(params), top_k=2, strategy="sorted", valid=valid)
    ref, _, _ = moe_lib.moe(x[:25], params, top_k=2, strategy="dense")
    np.testing.assert_allclose(np.asarray(y)[:25], np.asarray(ref), atol=STRATEGY_ATOL, rtol=0)


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_sorted_steps_of_any_size_are_exact(rng, chunk):
    """Experts whose run spans several steps, with a partly empty last step, still equal the oracle."""
    params, x = layer_and_input(GQA, rng, 37)
    routing = moe_lib.route(x, params["router"], 2)
    weights = tuple(mj.model.split_layer(params)[k] for k in ("w_gate", "w_up", "w_down"))
    y = moe_lib.moe_sorted(x, routing, jnp.ones(37, bool), weights, chunk=chunk)
    ref, _, _ = moe_lib.moe(x, params, top_k=2, strategy="dense")
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=STRATEGY_ATOL, rtol=0)
    assert moe_lib.sorted_chunk(8, 8, 2) == 8 and moe_lib.sorted_chunk(512, 8, 2) == 32
    assert moe_lib.sorted_chunk(40, 8, 2) == 32


@pytest.mark.parametrize("strategy", ["ragged", "blocked"])
def test_training_strategy_gradients_equal_the_oracle(rng, strategy):
    """`ragged` and `blocked` are the training paths: their gradients (inputs and every weight)
    equal dense's."""
    params, x = layer_and_input(GQA, rng, 24)
    valid = jnp.arange(24) < 20

    def loss(p, x, strategy):
        y, _, _ = moe_lib.moe(x, p, top_k=2, strategy=strategy, valid=valid)
        return jnp.sum(jnp.where(valid[:, None], y, 0.0) ** 2)

    got = jax.grad(loss, argnums=(0, 1))(params, x, strategy)
    ref = jax.grad(loss, argnums=(0, 1))(params, x, "dense")
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=GRAD_TOL, rtol=GRAD_TOL)


@pytest.mark.parametrize("rows", [1, 4, 16])
def test_blocked_blocks_of_any_size_are_exact(rng, rows):
    """Experts spanning several blocks, partly empty last blocks and padding tokens: still the oracle."""
    params, x = layer_and_input(GQA, rng, 37)
    valid = jnp.arange(37) < 30
    routing = moe_lib.route(x, params["router"], 2)
    weights = tuple(params[k] for k in ("w_gate", "w_up", "w_down"))
    y = moe_lib.moe_blocked(x, routing, valid, weights, rows=rows)
    ref, _, _ = moe_lib.moe(x[:30], params, top_k=2, strategy="dense")
    np.testing.assert_allclose(np.asarray(y)[:30], np.asarray(ref), atol=STRATEGY_ATOL, rtol=0)
    assert moe_lib.blocked_rows(8192, 8) == 128 and moe_lib.blocked_rows(48, 8) == 8
