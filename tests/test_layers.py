"""RMSNorm, RoPE and attention against HF's torch modules (float32, atol 1e-5)."""

import jax.numpy as jnp
import numpy as np

from mixtral_jax.layers import apply_rope, attention_mask, grouped_attention, rms_norm, rope_angles
from conftest import GQA, hf_model
from tolerances import LAYER_ATOL


def test_rms_norm_matches_hf(rng):
    import torch
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

    norm = MixtralRMSNorm(40, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(40))
    x = rng.standard_normal((3, 5, 40)).astype(np.float32) * 3
    with torch.inference_mode():
        ref = norm(torch.as_tensor(x)).numpy()
    got = rms_norm(jnp.asarray(x), jnp.asarray(norm.weight.detach().numpy()), 1e-5)
    np.testing.assert_allclose(np.asarray(got), ref, atol=LAYER_ATOL, rtol=0)


def test_rope_matches_hf_at_long_positions(rng):
    import torch
    from transformers.models.mixtral.modeling_mixtral import apply_rotary_pos_emb

    model = hf_model(GQA)
    positions = np.array([[0, 1, 2, 1000, 32767]])
    q = rng.standard_normal((1, 5, 6, 10)).astype(np.float32)
    k = rng.standard_normal((1, 5, 2, 10)).astype(np.float32)
    with torch.inference_mode():
        cos, sin = model.model.rotary_emb(torch.as_tensor(q), torch.as_tensor(positions))
        ref_q, ref_k = apply_rotary_pos_emb(torch.as_tensor(q).transpose(1, 2),
                                            torch.as_tensor(k).transpose(1, 2), cos, sin)
    ours_cos, ours_sin = rope_angles(jnp.asarray(positions), 10, GQA.rope_theta)
    np.testing.assert_allclose(np.asarray(apply_rope(jnp.asarray(q), ours_cos, ours_sin)),
                               ref_q.transpose(1, 2).numpy(), atol=LAYER_ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(apply_rope(jnp.asarray(k), ours_cos, ours_sin)),
                               ref_k.transpose(1, 2).numpy(), atol=LAYER_ATOL, rtol=0)


def test_grouped_attention_matches_hf_attention_module(rng):
    import torch

    model = hf_model(GQA)
    attn = model.model.layers[0].self_attn
    t = 13
    x = rng.standard_normal((2, t, GQA.d_model)).astype(np.float32)
    positions = np.tile(np.arange(t), (2, 1))
    with torch.inference_mode():
        xt = torch.as_tensor(x)
        pos_emb = model.model.rotary_emb(xt, torch.as_tensor(positions))
        causal = torch.full((t, t), float("-inf")).triu(1)[None, None]
        ref = attn(xt, pos_emb, causal)[0].numpy()
    w = {k: v.detach().numpy() for k, v in attn.state_dict().items()}
    d, n, kv, h = GQA.d_model, GQA.n_heads, GQA.n_kv_heads, GQA.head_dim
    wq = jnp.asarray(w["q_proj.weight"].T.reshape(d, n, h))
    wk = jnp.asarray(w["k_proj.weight"].T.reshape(d, kv, h))
    wv = jnp.asarray(w["v_proj.weight"].T.reshape(d, kv, h))
    wo = jnp.asarray(w["o_proj.weight"].T.reshape(n, h, d))
    cos, sin = rope_angles(jnp.asarray(positions), h, GQA.rope_theta)
    xj = jnp.asarray(x)
    q = apply_rope(jnp.einsum("btd,dnh->btnh", xj, wq), cos, sin)
    k = apply_rope(jnp.einsum("btd,dkh->btkh", xj, wk), cos, sin)
    v = jnp.einsum("btd,dkh->btkh", xj, wv)
    mask = attention_mask(jnp.asarray(positions), jnp.arange(t), jnp.ones((2, t), bool), None)
    out = jnp.einsum("btnh,nhd->btd", grouped_attention(q, k, v, mask), wo)
    np.testing.assert_allclose(np.asarray(out), ref, atol=LAYER_ATOL, rtol=0)


def test_embed_rows_equal_indexing_and_leave_a_bfloat16_table_as_it_is():
    """`embed_rows` is `table[tokens]` in value and gradient; in a loop that looks up one token a
    step (`generate`'s decode), XLA:CPU made a float32 copy of a bfloat16 table with plain indexing."""
    import re

    import jax

    from mixtral_jax.model import embed_rows

    table = jax.random.normal(jax.random.key(0), (512, 64))
    tokens = jnp.array([[1, 7, 7, 300]])
    for dtype in (jnp.float32, jnp.bfloat16):
        t = table.astype(dtype)
        assert embed_rows(t, tokens).dtype == dtype
        np.testing.assert_array_equal(np.asarray(embed_rows(t, tokens), np.float32), np.asarray(t[tokens], np.float32))
        loss = lambda f: lambda w: (f(w, tokens).astype(jnp.float32) ** 2).sum()  # noqa: E731
        np.testing.assert_array_equal(np.asarray(jax.grad(loss(embed_rows))(t), np.float32),
                                      np.asarray(jax.grad(loss(lambda w, i: w[i]))(t), np.float32))

    def widened_copies(lookup) -> int:
        def run(t, tok):
            def body(_, carry):
                x, tok = carry
                return x + lookup(t, tok[:, None]).astype(jnp.float32)[:, 0], (tok + 1) % 512
            return jax.lax.fori_loop(0, 4, body, (jnp.zeros((1, 64)), tok))
        text = jax.jit(run).lower(table.astype(jnp.bfloat16), jnp.array([3])).compile().as_text()
        return len(re.findall(r"f32\[512,64\]", text))

    assert widened_copies(embed_rows) == 0
