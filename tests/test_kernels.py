"""CPU decode kernels (mixtral_jax.kernels) against the pure-JAX path they replace, and HF.

Dimensions here are multiples of 16 (the kernels' requirement), unlike the rest of the suite's
tiny configs, so these are the tests that run the kernels inside whole models."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax import kernels, quant
from mixtral_jax import moe as moe_lib
from conftest import hf_logits, hf_model
from tolerances import BF16_ROUND_RTOL, GRAD_TOL, INT8_LOGITS_ATOL, INT8_ROW_RTOL, KERNEL_RTOL, LOGITS_ATOL, STRATEGY_ATOL

KCONFIG = mj.MixtralConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                           d_ff=96, n_experts=8, top_k=2, max_seq_len=256)
OFF = os.environ.get(kernels.ENV) == "0"


def test_status_says_which_path_runs():
    """CI builds the kernels (a compiler is there): they must be on unless turned off."""
    line = kernels.status()
    if OFF:
        assert line.startswith("CPU kernels off") and kernels.ENV in line
    else:
        assert line.startswith("CPU kernels on"), line
        assert kernels.enabled() and not kernels.enabled(mesh=object())


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


needs_kernels = pytest.mark.skipif(OFF, reason=f"{kernels.ENV}=0: the pure-JAX path is tested elsewhere")


@needs_kernels
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("nk", [False, True])
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("k, n", [(96, 160), (256, 4112)])  # the second: several row blocks and column blocks
def test_linear_equals_the_pure_path(rng, rows, nk, kind, k, n):
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((n, k) if nk else (k, n)), jnp.float32)
    if kind == "bfloat16":
        w = w.astype(jnp.bfloat16)
    elif kind == "int8":
        w = quant.quantize_int8(w, (1,) if nk else (0,))
    assert kernels.fits(rows, w)
    ours = jax.jit(lambda x, w: kernels.linear(x, w, nk=nk))(x, w)
    # The oracle: the weight as the pure path dequantizes it, float32 products, float64 sums.
    wf = np.asarray(quant.dequantize(w, jnp.float32), np.float64)
    ref = np.asarray(x, np.float64) @ (wf.T if nk else wf)
    assert ours.dtype == jnp.float32 and ours.shape == (rows, n)
    # One row against int8 [out, in] rows: on AVX2 the row is rounded to int16 (`_int16_rows`).
    assert _rel_err(ours, ref) < (INT8_ROW_RTOL if kind == "int8" and nk and rows == 1 else KERNEL_RTOL)
    if kind == "int8" and nk and rows == 1 and kernels.isa() == "avx2":
        wq = np.asarray(w["q"], np.float64) * np.asarray(w["scale"], np.float64).reshape(n, 1)
        assert _rel_err(ours, _int16_rows(np.asarray(x)) @ wq.T) < KERNEL_RTOL


def _int16_rows(x: np.ndarray) -> np.ndarray:
    """x [M, K] float32 as the AVX2 int8 kernels round it (float64): blocks of 64 along K, each
    scaled to int16 by its largest |x| / 32767 in float32, rounded half to even."""
    out = np.zeros(x.shape, np.float64)
    for b in range(0, x.shape[1], 64):
        block = x[:, b:b + 64].astype(np.float32)
        most = np.abs(block).max(axis=1, keepdims=True)
        scale = np.where(most > 0, most / np.float32(32767), np.float32(1)).astype(np.float32)
        q = np.rint(block * (np.float32(1) / scale))
        out[:, b:b + 64] = q.astype(np.float64) * scale.astype(np.float64)
    return out


@needs_kernels
def test_linear_gradient_is_the_pure_paths(rng):
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)

    def loss(fn, x, w):
        return jnp.sum(jnp.sin(fn(x, w)))
    got = jax.grad(lambda x, w: loss(kernels.linear, x, w), argnums=(0, 1))(x, w)
    want = jax.grad(lambda x, w: loss(jnp.matmul, x, w), argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=GRAD_TOL, rtol=GRAD_TOL)


@needs_kernels
@pytest.mark.parametrize("n_heads, kv_heads, head_dim", [(16, 4, 64), (4, 4, 16), (8, 2, 128)])
@pytest.mark.parametrize("window", [None, 40])
def test_decode_attention_kernel_equals_blockwise_and_the_oracle(rng, n_heads, kv_heads, head_dim, window):
    """One query per row over a cache of more rows (a server's): rows read out of order, lengths
    across several 256-slot blocks, a row that sees nothing of its own (kv_len at q_pos: an idle
    slot) and a padding row (out of range), which get zeros."""
    from mixtral_jax import attention as att

    r, s = 5, 768
    k = jnp.asarray(rng.standard_normal((r, s, kv_heads, head_dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((r, s, kv_heads, head_dim)), jnp.float32)
    rows = jnp.asarray([3, 0, 4, 1, 2, r], jnp.int32)
    q_pos = jnp.asarray([[700], [0], [255], [256], [300], [10]], jnp.int32)
    kv_len = jnp.asarray([701, 1, 256, 257, 300, 11], jnp.int32)   # row 4 (at 300) sees only slots < 300
    q = jnp.asarray(rng.standard_normal((6, 1, n_heads, head_dim)), jnp.float32)
    assert kernels.attention_fits(q, k)
    ours = np.asarray(jax.jit(lambda *a: att.decode_kernel(*a, sliding_window=window, rows=rows))(q, k, v, q_pos,
                                                                                                 kv_len))
    blockwise = np.asarray(att.blockwise_attention(q, k, v, q_pos, kv_len, sliding_window=window, rows=rows))
    taken = [jnp.take(a, jnp.minimum(rows, r - 1), axis=0) for a in (k, v)]
    oracle = np.asarray(att.materialized_attention(q, *taken, q_pos, kv_len, sliding_window=window))
    assert _rel_err(ours[:5], oracle[:5]) <= KERNEL_RTOL and _rel_err(ours[:5], blockwise[:5]) <= KERNEL_RTOL
    assert not ours[5].any()                                      # the padding row


@needs_kernels
def test_decode_attention_kernel_reads_a_bfloat16_cache(rng):
    """A bfloat16 model's cache and queries: keys and values are widened exactly, so in float32 the
    kernel matches the oracle on the widened cache; through `decode_kernel` the result comes back
    in bfloat16."""
    from mixtral_jax import attention as att

    r, s, n_heads, kv_heads, head_dim = 3, 300, 8, 2, 64
    k, v = (jnp.asarray(rng.standard_normal((r, s, kv_heads, head_dim)), jnp.bfloat16) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((r, 1, n_heads, head_dim)), jnp.bfloat16)
    rows = jnp.arange(r, dtype=jnp.int32)
    q_pos = jnp.asarray([[299], [100], [5]], jnp.int32)
    kv_len = jnp.asarray([300, 101, 6], jnp.int32)
    assert kernels.attention_fits(q, k)
    q32, k32, v32 = (a.astype(jnp.float32) for a in (q, k, v))
    oracle = np.asarray(att.materialized_attention(q32, k32, v32, q_pos, kv_len))
    exact = np.asarray(jax.jit(lambda *a: kernels.attend(*a, None, None))(q32[:, 0], k, v, rows, q_pos[:, 0],
                                                                           kv_len))
    assert _rel_err(exact, oracle[:, 0]) <= KERNEL_RTOL
    ours = jax.jit(att.decode_kernel)(q, k, v, q_pos, kv_len)
    assert ours.dtype == jnp.bfloat16
    assert _rel_err(np.asarray(ours.astype(jnp.float32)), oracle) <= BF16_ROUND_RTOL


@needs_kernels
def test_decode_attention_kernel_gradient_is_the_pure_paths(rng):
    from mixtral_jax import attention as att

    k, v = (jnp.asarray(rng.standard_normal((2, 300, 2, 16)), jnp.float32) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((2, 1, 4, 16)), jnp.float32)
    q_pos, kv_len = jnp.asarray([[280], [40]], jnp.int32), jnp.asarray([281, 41], jnp.int32)

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v, q_pos, kv_len)))
    got = jax.grad(lambda *a: loss(att.decode_kernel, *a), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: loss(att.blockwise_attention, *a), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=GRAD_TOL, rtol=GRAD_TOL)


def _split_layer(rng, kind, config=KCONFIG):
    params = mj.init_params(config, seed=1)["layers_0"]
    params = jax.tree.map(lambda a: a * 10.0, params)  # routing decisions matter
    layer = mj.model.split_layer(params)
    if kind == "bfloat16":
        layer = jax.tree.map(lambda a: a.astype(jnp.bfloat16), layer)
    elif kind == "int8":
        layer = quant.quantize_layer(layer)
    return layer


@needs_kernels
# 1-16 tokens: the decode loop; 17-512 (a prompt chunk): the register-blocked panels, 100
# and 300 with panels of several widths and more than one panel per expert.
@pytest.mark.parametrize("n_tokens", [1, 3, 16, 17, 100, 300])
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
def test_moe_kernel_equals_sorted_and_the_oracle(rng, n_tokens, kind):
    layer = _split_layer(rng, kind)
    dtype = jnp.bfloat16 if kind == "bfloat16" else jnp.float32
    x = jnp.asarray(rng.standard_normal((n_tokens, KCONFIG.d_model)), dtype)
    valid = jnp.arange(n_tokens) != 1                       # a padding token takes no expert
    weights = (layer["w_gate"], layer["w_up"], layer["w_down"])
    # Above 16 tokens `auto` takes the kernel with AVX-512 or AVX2 only; the kernel itself runs anywhere.
    takes_kernel = n_tokens <= kernels.moe_max_rows()
    assert moe_lib.kernel_fits(n_tokens, weights) == takes_kernel
    assert kernels.moe_max_rows() in (kernels.MAX_ROWS, kernels.MOE_MAX_ROWS)
    run = jax.jit(lambda x, s: moe_lib.moe(x, layer, top_k=2, valid=valid, strategy=s)[0], static_argnums=1)
    ours = jax.jit(lambda x: moe_lib.moe_kernel(x, moe_lib.route(x, layer["router"], 2), valid, weights))(x)
    auto_hlo = jax.jit(lambda x: moe_lib.moe(x, layer, top_k=2, strategy="auto")[0]).lower(x).as_text()
    assert ("mj_moe" in auto_hlo) == takes_kernel
    # bf16: the kernel widens to float32 and rounds once; the pure path rounds after every op.
    # int8, one token: on AVX2 its row (and each expert's hidden row) is rounded to int16.
    tol = {"bfloat16": 5e-2, "int8": INT8_ROW_RTOL if n_tokens == 1 else STRATEGY_ATOL}.get(kind, STRATEGY_ATOL)
    if n_tokens > 1:
        assert float(jnp.abs(ours[1]).max()) == 0.0 == float(jnp.abs(run(x, "sorted")[1]).max())
    for strategy in ("sorted", "dense"):  # dense has no padding: compare the valid rows
        ref = run(x, strategy).astype(jnp.float32)
        assert _rel_err(ours[valid], ref[valid]) < max(tol, KERNEL_RTOL)


@needs_kernels
@pytest.mark.parametrize("counts", [(128, 96, 64, 12), (5, 37, 50, 48)])
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
def test_moe_kernel_experts_with_given_token_counts(rng, kind, counts):
    """Experts 0-3 take `counts` tokens as first choice, each token's second expert is one of 4-7.
    (128, 96, 64): tokens filling multiples of 32 lanes, whose 16-lane panels the kernel lays out
    with 8 lanes more per row (rows a multiple of 128 bytes apart share L1's sets); (5, 37, 50, 48):
    8-lane panels of 1, 5, 7 and 6 vectors, stored in groups of 1, 2 + 3, 3 + 2 + 2 and 3 + 3."""
    layer = _split_layer(rng, kind)
    n_tokens, n_experts = sum(counts), KCONFIG.n_experts
    dtype = jnp.bfloat16 if kind == "bfloat16" else jnp.float32
    x = jnp.asarray(rng.standard_normal((n_tokens, KCONFIG.d_model)), dtype)
    first = np.searchsorted(np.cumsum(counts)[:-1], np.arange(n_tokens), side="right")
    second = rng.integers(4, n_experts, n_tokens)
    experts = jnp.asarray(np.stack([first, second], 1), jnp.int32)
    gates = jax.nn.softmax(jnp.asarray(rng.standard_normal((n_tokens, 2)), jnp.float32), axis=-1)
    routing = moe_lib.Routing(jnp.zeros((n_tokens, n_experts), jnp.float32), gates, experts)
    assert np.bincount(np.asarray(experts).ravel(), minlength=n_experts)[:4].tolist() == list(counts)
    weights = (layer["w_gate"], layer["w_up"], layer["w_down"])
    valid = jnp.ones((n_tokens,), bool)
    ours = jax.jit(lambda x: moe_lib.moe_kernel(x, routing, valid, weights))(x)
    ref = jax.jit(lambda x: moe_lib.moe_dense(x, routing, weights))(x).astype(jnp.float32)
    tol = {"bfloat16": 5e-2}.get(kind, STRATEGY_ATOL)
    assert _rel_err(ours, ref) < max(tol, KERNEL_RTOL)


@needs_kernels
@pytest.mark.parametrize("kind, top_k", [("float32", 2), ("bfloat16", 2), ("int8", 2), ("float32", 1), ("float32", 3)])
def test_moe_kernel_one_token_with_half_blocks(rng, kind, top_k):
    """One token where D and F are multiples of 16 but not of 32: the last 16 of every weight row
    outside the loops' 32-wide steps (the paired rows of one-token decode); one and three experts
    leave an expert without a partner in stage 2."""
    config = KCONFIG.replace(d_model=80, d_ff=144, top_k=top_k)
    layer = _split_layer(rng, kind, config)
    x = jnp.asarray(rng.standard_normal((1, config.d_model)), jnp.float32)
    weights = (layer["w_gate"], layer["w_up"], layer["w_down"])
    valid = jnp.ones((1,), bool)
    ours = jax.jit(lambda x: moe_lib.moe_kernel(x, moe_lib.route(x, layer["router"], top_k), valid, weights))(x)
    ref = jax.jit(lambda x: moe_lib.moe(x, layer, top_k=top_k, valid=valid, strategy="dense")[0])(x)
    tol = {"bfloat16": 5e-2, "int8": INT8_ROW_RTOL}.get(kind, STRATEGY_ATOL)
    assert _rel_err(ours, ref.astype(jnp.float32)) < max(tol, KERNEL_RTOL)


@needs_kernels
def test_moe_kernel_gradient_is_the_oracles(rng):
    layer = _split_layer(rng, "float32")
    x = jnp.asarray(rng.standard_normal((4, KCONFIG.d_model)), jnp.float32)

    def loss(x, layer, strategy):
        return jnp.sum(jnp.sin(moe_lib.moe(x, layer, top_k=2, strategy=strategy)[0]))
    got = jax.grad(loss, argnums=(0, 1))(x, layer, "kernel")
    want = jax.grad(loss, argnums=(0, 1))(x, layer, "dense")
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=GRAD_TOL, rtol=GRAD_TOL)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    model = hf_model(KCONFIG)
    path = tmp_path_factory.mktemp("hf_kernels")
    model.save_pretrained(path)
    return model, path


def _decode_logits(path, tokens, quantize=None):
    """Logits of each position fed one token at a time through the cache (the decode path)."""
    model = mj.load(path, dtype="float32", quantize=quantize)
    cache = mj.init_cache(model.config, tokens.shape[0], 64)
    step = jax.jit(lambda p, t, c: mj.forward(model.config, p, t, cache=c))
    out = []
    for i in range(tokens.shape[1]):
        logits, cache = step(model.params, tokens[:, i:i + 1], cache)
        out.append(np.asarray(logits[:, 0]))
    hlo = step.lower(model.params, tokens[:, :1], cache).as_text()
    return np.stack(out, 1), hlo


def test_decode_with_kernels_equals_hf(hf_pair, rng):
    """Whole model, token by token (every matrix product of decode on the kernels): HF's logits."""
    model, path = hf_pair
    tokens = rng.integers(0, KCONFIG.vocab_size, (2, 7))
    ours, hlo = _decode_logits(path, tokens)
    assert ("mj_moe" in hlo and "mj_linear" in hlo) != OFF
    np.testing.assert_allclose(ours, hf_logits(model, tokens), atol=LOGITS_ATOL, rtol=0)


_CHILD = """
import json, sys, numpy as np
sys.path.insert(0, {tests!r})
from test_kernels import _decode_logits
tokens = np.array(json.loads(sys.argv[1]))
for quantize in (None, "int8"):
    logits, hlo = _decode_logits({path!r}, tokens, quantize)
    print(json.dumps({{"logits": logits.tolist(), "custom_calls": "mj_" in hlo}}))
"""


def test_kernels_off_is_the_pure_path_and_agrees(hf_pair, rng):
    """MIXTRAL_JAX_CPU_KERNELS=0 (a fresh process: the choice is made when a program is traced)
    runs no custom call and gives the kernels' logits, float32 and int8."""
    model, path = hf_pair
    tokens = rng.integers(0, KCONFIG.vocab_size, (1, 5))
    code = _CHILD.format(tests=os.path.dirname(__file__), path=str(path))
    env = dict(os.environ, **{kernels.ENV: "0"})
    run = subprocess.run([sys.executable, "-c", code, json.dumps(tokens.tolist())], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    children = [json.loads(line) for line in run.stdout.splitlines()]
    for child, quantize in zip(children, (None, "int8")):
        assert not child["custom_calls"]
        ours, _ = _decode_logits(path, tokens, quantize)
        np.testing.assert_allclose(ours, np.array(child["logits"]), rtol=0,
                                   atol=INT8_LOGITS_ATOL if quantize else LOGITS_ATOL)


@needs_kernels
def test_read_probe_sums(rng):
    x = jnp.asarray(rng.random(100_003), jnp.float32)
    assert abs(float(kernels.read_probe(x)) - float(np.sum(np.asarray(x, np.float64)))) < 1e-2
