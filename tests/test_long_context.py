"""Long context at the model level: chunked prefill, HF parity over thousands of tokens, memory, compiles."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax import sampler
from conftest import GQA, hf_model
from tolerances import CACHE_ATOL, LOGITS_ATOL

# Odd sizes, 8 experts top-2, GQA; context long enough for the parity runs.
LONG = GQA.replace(n_layers=2, max_seq_len=4608)


def params_of(config, scale=3.0):
    """Weights wider than N(0, 0.02) so routing matters, not so wide that 100-token float32 roundoff
    reaches 1e-5 (at 10x it does, chunked or not, materialised or blockwise)."""
    return jax.tree.map(lambda a: a * scale if a.ndim > 1 else a, mj.init_params(config, seed=5))


def tree_max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("offset", [0, 37])
def test_chunked_prefill_equals_one_shot(rng, offset):
    """Chunks of T, T/2 and 7 tokens: logits and cache within 1e-5 of one-shot prefill, with rows of
    different lengths, after an existing cache (offset) or none."""
    config = LONG.replace(max_seq_len=512)
    params = params_of(config)
    t = 100
    tokens = rng.integers(0, config.vocab_size, (2, t))
    lengths = np.array([t, 61])
    start = mj.init_cache(config, 2, 200)
    if offset:
        _, start = mj.forward(config, params, rng.integers(0, config.vocab_size, (2, offset)), cache=start)
    ref, ref_cache = mj.forward(config, params, tokens, lengths=lengths, cache=start)
    valid = np.arange(t)[None, :] < lengths[:, None]
    for chunk in (t, t // 2, 7):
        got, cache = mj.forward(config, params, tokens, lengths=lengths, cache=start, prefill_chunk=chunk)
        assert np.max(np.abs(np.asarray(got) - np.asarray(ref))[valid]) <= CACHE_ATOL
        assert tree_max_diff(cache, ref_cache) <= CACHE_ATOL
        np.testing.assert_array_equal(np.asarray(cache["lengths"]), offset + lengths)
    uncached = np.asarray(mj.forward(config, params, tokens, lengths=lengths))
    chunked = np.asarray(mj.forward(config, params, tokens, lengths=lengths, prefill_chunk=7))
    assert np.max(np.abs(chunked - uncached)[valid]) <= CACHE_ATOL


def test_generate_with_and_without_prefill_chunks(rng):
    config = LONG.replace(max_seq_len=512)
    model = mj.Model(config, params_of(config))
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (150, 41, 7)]
    whole = mj.generate(model, prompts, max_new_tokens=12, stop_tokens=[], prefill_chunk=None)
    assert mj.generate(model, prompts, max_new_tokens=12, stop_tokens=[], prefill_chunk=32) == whole
    assert mj.generate(model, prompts, max_new_tokens=12, stop_tokens=[], prefill_chunk=7) == whole
    with pytest.raises(ValueError, match="prefill_chunk"):
        mj.generate(model, prompts, max_new_tokens=2, prefill_chunk=-1)
    with pytest.raises(ValueError, match="attention"):
        mj.generate(model, prompts, max_new_tokens=2, attention="magic")
    with pytest.raises(ValueError, match="attention"):
        mj.forward(config, model.params, [[1, 2]], attention="magic")


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    model = hf_model(LONG, seed=3, std=0.1)
    model.config._attn_implementation = "sdpa"
    path = tmp_path_factory.mktemp("hf_long")
    model.save_pretrained(path)
    return model, mj.load(path, dtype="float32")


def test_3000_tokens_match_hf_sdpa(hf_pair, rng):
    import torch

    model, ours = hf_pair
    tokens = rng.integers(0, LONG.vocab_size, (1, 3000))
    with torch.inference_mode():
        ref = model(torch.as_tensor(tokens)).logits.float().numpy()
    for kw in (dict(), dict(prefill_chunk=512)):
        got = np.asarray(mj.forward(ours.config, ours.params, tokens, **kw))
        np.testing.assert_allclose(got, ref, atol=LOGITS_ATOL, rtol=0)
        np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))


def test_greedy_after_a_4000_token_prompt_equals_hf(hf_pair, rng):
    import torch

    model, ours = hf_pair
    prompt = rng.integers(0, LONG.vocab_size, 4000).tolist()
    got = mj.generate(ours, [prompt], max_new_tokens=24, stop_tokens=[])[0]
    with torch.inference_mode():
        ids = torch.tensor([prompt])  # the explicit mask: generate would mask out every id equal to pad
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24,
                             do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert got == ref


MEMORY_CHILD = """
import json, resource, sys
import numpy as np
import mixtral_jax as mj
config = mj.MixtralConfig.tiny().replace(max_seq_len=32768)
params = mj.init_params(config, seed=0)
tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, 32768))
logits = np.asarray(mj.forward(config, params, tokens, prefill_chunk=int(sys.argv[1]) or None))
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
print(json.dumps({"peak": peak, "finite": bool(np.isfinite(logits).all()), "shape": list(logits.shape)}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [0, 2048])
def test_32k_forward_on_tiny_fits_in_2gb(chunk):
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(chunk)], capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["finite"] and r["shape"] == [1, 32768, 1000]
    assert r["peak"] < 2e9, r


def attention_temp_bytes(t: int, attention: str) -> int:
    """Compiled temp bytes of one layer's attention over t tokens (tiny config's heads)."""
    from mixtral_jax.attention import Chunk, attend

    c = mj.MixtralConfig.tiny()
    q = jax.ShapeDtypeStruct((1, t, c.n_heads, c.head_dim), np.float32)
    kv = jax.ShapeDtypeStruct((1, t, c.n_kv_heads, c.head_dim), np.float32)
    pos = jax.ShapeDtypeStruct((1, t), np.int32)
    n = jax.ShapeDtypeStruct((1,), np.int32)
    fn = jax.jit(lambda q, k, v, p, n: attend(attention, q, k, v, p, n, Chunk(k, v, n, None)))
    return fn.lower(q, kv, kv, pos, n).compile().memory_analysis().temp_size_in_bytes


def test_attention_memory_grows_linearly():
    blockwise = attention_temp_bytes(32768, "blockwise") / attention_temp_bytes(8192, "blockwise")
    materialized = attention_temp_bytes(8192, "materialized") / attention_temp_bytes(2048, "materialized")
    assert blockwise <= 5, blockwise
    assert materialized >= 12, materialized  # the square: 16x for 4x the tokens


@pytest.mark.slow
def test_prompt_lengths_up_to_32k_compile_at_most_16_programs():
    """Every power-of-two bucket from 16 to 32,768 and both sides of each boundary, one new token."""
    config = mj.MixtralConfig.tiny().replace(max_seq_len=32768)
    model = mj.Model(config, mj.init_params(config, seed=0))
    lengths = sorted({1, 32767} | {n + d for k in range(4, 16) for n in [2 ** k] for d in (-1, 0, 1)
                                   if 1 <= n + d <= 32767})
    before = sampler.compiled_programs()
    for n in lengths:
        out = mj.generate(model, [[5] * n], max_new_tokens=1, stop_tokens=[])
        assert len(out[0]) == 1
    assert sampler.compiled_programs() - before <= 16
    with pytest.raises(ValueError, match="exceeds the context"):
        mj.generate(model, [[5] * 32767], max_new_tokens=2)


@pytest.mark.parametrize("chunk", [0, 1024, 2048])
def test_plan_prefill_activations_within_25_percent_of_xla(chunk):
    """plan's count of one layer's live buffers against XLA's memory_analysis() of the compiled
    prefill (tiny config, a 32,768-token prompt, the split layout `load` gives on CPU)."""
    from mixtral_jax.model import split_layer
    from mixtral_jax.plan import plan_memory

    config = mj.MixtralConfig.tiny().replace(max_seq_len=32768)
    params = {k: split_layer(v) if k.startswith("layers_") else v for k, v in mj.init_params(config).items()}
    model = mj.Model(config, params)
    b = sampler.prepare(model, [[5] * 32767], max_new_tokens=1, stop_tokens=[], prefill_chunk=chunk)
    compiled = sampler._prefill_jit.lower(config, params, b.tokens, b.lengths, b.params, b.seeds, b.stop,
                                          b.max_new, static=b.static).compile()
    xla = compiled.memory_analysis().temp_size_in_bytes
    planned = plan_memory(config, {"data": 1, "expert": 1, "tensor": 1}, dtype="float32", batch=1,
                          prompt_len=32768, prefill_chunk=chunk)["prefill_activations"]
    assert 0.75 <= planned / xla <= 1.25, (planned, xla)


def test_plan_counts_the_int8_cache():
    from mixtral_jax.plan import plan_memory

    c = mj.MixtralConfig.mixtral_8x7b()
    mesh = {"data": 1, "expert": 8, "tensor": 1}
    bf16 = plan_memory(c, mesh, dtype="bfloat16", batch=8, max_seq_len=32768)
    int8 = plan_memory(c, mesh, dtype="bfloat16", batch=8, max_seq_len=32768, kv_dtype="int8")
    scales = 2 * c.n_layers * 8 * 32768 * c.n_kv_heads * 4
    assert int8["kv_cache"] == bf16["kv_cache"] // 2 + scales and int8["kv_dtype"] == "int8"
    chunked = plan_memory(c, mesh, dtype="bfloat16", prompt_len=32768, prefill_chunk=2048)
    whole = plan_memory(c, mesh, dtype="bfloat16", prompt_len=32768)
    assert chunked["prefill_activations"] * 8 < whole["prefill_activations"]
