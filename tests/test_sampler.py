"""generate / generate_stream: HF greedy parity, filters vs numpy references, seeds, stops, compiles."""

import jax
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax import sampler
from conftest import GQA, hf_model

CONFIG = GQA.replace(max_seq_len=1024)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    model = hf_model(CONFIG, seed=21)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    return model, mj.load(path)


def prompts_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, CONFIG.vocab_size, n).tolist() for n in lengths]


def test_batched_greedy_equals_hf_generate_per_prompt(pair):
    import torch

    hf, ours = pair
    prompts = prompts_of([1, 7, 23, 64])
    out = mj.generate(ours, prompts, max_new_tokens=64, stop_tokens=[])
    for prompt, got in zip(prompts, out):
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert got == ref
    assert len({tuple(o) for o in out}) == 4


# ---- filters against plain numpy (HF's LogitsWarper semantics) ----

def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def np_filter(logits, temperature, top_k, top_p, min_p):
    x = logits / (temperature if temperature > 0 else 1.0)
    if top_k > 0:
        kth = np.sort(x)[::-1][min(top_k, x.size) - 1]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1.0:
        order = np.argsort(x, kind="stable")
        cum = np.cumsum(np_softmax(x[order]))
        remove = cum <= 1 - top_p
        remove[-1] = False
        x = x.copy()
        x[order[remove]] = -np.inf
    if min_p > 0:
        p = np_softmax(x)
        x = np.where(p < min_p * p.max(), -np.inf, x)
    return x


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.1),
    (0.9, 20, 0.9, 0.05), (1.0, 1, 1.0, 0.0), (2.0, 0, 0.3, 0.0), (1.0, 3, 0.5, 0.2)])
def test_filters_match_numpy_reference(rng, temperature, top_k, top_p, min_p):
    logits = (rng.standard_normal((6, 300)) * 3).astype(np.float32)
    p = sampler.SamplingParams(*(np.full(6, v, dt) for v, dt in (
        (temperature, np.float32), (top_k, np.int32), (top_p, np.float32), (min_p, np.float32))))
    got = np.asarray(sampler.filter_logits(logits, p))
    for row in range(6):
        ref = np_filter(logits[row].astype(np.float64), temperature, top_k, top_p, min_p)
        kept = np.isfinite(ref)
        np.testing.assert_array_equal(got[row] > np.finfo(np.float32).min, kept)
        np.testing.assert_allclose(got[row][kept], ref[kept], rtol=1e-6)
    assert (got > np.finfo(np.float32).min).sum() < got.size or (top_k, top_p, min_p) == (0, 1.0, 0.0)


def test_samples_follow_the_filtered_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    p = sampler.SamplingParams(np.ones(1, np.float32), np.zeros(1, np.int32), np.full(1, 0.7, np.float32),
                               np.zeros(1, np.float32))
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = np.asarray(jax.vmap(lambda k: sampler.sample(logits, p, k[None]))(keys))[:, 0]
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(freq, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.03)  # top-p 0.7 keeps 2


def test_temperature_to_zero_equals_greedy(pair):
    _, ours = pair
    prompts = prompts_of([5, 9])
    greedy = mj.generate(ours, prompts, max_new_tokens=12, stop_tokens=[])
    assert mj.generate(ours, prompts, max_new_tokens=12, temperature=1e-5, seed=7, stop_tokens=[]) == greedy


def test_seed_reproduces_and_matters(pair):
    _, ours = pair
    prompts = prompts_of([5, 9])
    a = mj.generate(ours, prompts, max_new_tokens=16, temperature=1.5, seed=1, stop_tokens=[])
    assert mj.generate(ours, prompts, max_new_tokens=16, temperature=1.5, seed=1, stop_tokens=[]) == a
    assert mj.generate(ours, prompts, max_new_tokens=16, temperature=1.5, seed=2, stop_tokens=[]) != a


def test_per_row_parameters_act_per_row(pair):
    _, ours = pair
    prompts = prompts_of([4, 11, 6])
    kw = dict(max_new_tokens=[10, 14, 5], temperature=[0.0, 1.2, 0.8], top_k=[0, 10, 0], top_p=[1.0, 1.0, 0.9],
              min_p=[0.0, 0.0, 0.05], seed=[0, 3, 4], stop_tokens=[])
    batched = mj.generate(ours, prompts, **kw)
    for r in range(3):
        alone = mj.generate(ours, [prompts[r]], **{k: (v if k == "stop_tokens" else [v[r]]) for k, v in kw.items()})
        assert batched[r] == alone[0]
    assert [len(o) for o in batched] == [10, 14, 5]


def test_stop_tokens_end_one_row_while_others_continue(pair):
    _, ours = pair
    prompts = prompts_of([3, 8])
    free = mj.generate(ours, prompts, max_new_tokens=20, stop_tokens=[])
    stop = free[0][4]
    expected = [row[:row.index(stop) + 1] if stop in row else row for row in free]
    got = mj.generate(ours, prompts, max_new_tokens=20, stop_tokens=[stop])
    assert got == expected and len(got[0]) <= 5 and got[0][-1] == stop
    assert len(got[1]) > len(got[0])


def test_stream_yields_the_same_tokens(pair):
    _, ours = pair
    prompts = prompts_of([2, 13, 30])
    free = mj.generate(ours, prompts, max_new_tokens=15, stop_tokens=[])
    stop = free[1][6]
    kw = dict(max_new_tokens=15, temperature=[0.0, 0.0, 1.0], seed=5, stop_tokens=[stop])
    tokens = mj.generate(ours, prompts, **kw)
    steps = list(mj.generate_stream(ours, prompts, **kw))
    streamed = [[s[r] for s in steps if s[r] is not None] for r in range(3)]
    assert streamed == tokens
    assert any(s[1] is None for s in steps)  # row 1 stopped early and was reported as None


def test_logprobs_are_log_softmax_of_raw_logits(pair):
    _, ours = pair
    prompts = prompts_of([6])
    tokens, logprobs = mj.generate(ours, prompts, max_new_tokens=8, temperature=1.0, seed=3, stop_tokens=[],
                                   logprobs=True)
    seq = prompts[0] + tokens[0]
    logits = np.asarray(mj.forward(ours.config, ours.params, [seq]))[0]
    ref = jax.nn.log_softmax(logits, axis=-1)
    expected = [float(ref[len(prompts[0]) - 1 + i, t]) for i, t in enumerate(tokens[0])]
    np.testing.assert_allclose(logprobs[0], expected, atol=1e-4)


def test_compile_count_over_prompt_lengths_and_sampling_changes(pair):
    _, ours = pair
    before = sampler.compiled_programs()
    for n in range(1, 513):
        mj.generate(ours, [[5] * n], max_new_tokens=2, stop_tokens=[])
    sweep = sampler.compiled_programs() - before
    assert 1 <= sweep <= 10
    before = sampler.compiled_programs()
    for kw in (dict(temperature=0.7), dict(temperature=1.3, top_p=0.5), dict(seed=9, top_k=3, min_p=0.1)):
        mj.generate(ours, [[5] * 40], max_new_tokens=2, stop_tokens=[], **kw)
    assert sampler.compiled_programs() == before


@pytest.mark.parametrize("kw, match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(min_p=1.5), "min_p"), (dict(min_p=-0.1), "min_p"), (dict(seed=-1), "seed"),
    (dict(prompts=[[]]), "empty"), (dict(prompts=[]), "non-empty"), (dict(prompts=[[1, 101]]), "out of range"),
    (dict(prompts=[[1] * 1000], max_new_tokens=30), "exceeds the context"),
    (dict(prompts=["text"]), "tokenizer"), (dict(temperature=[0.5, 0.5, 0.5]), "one value per prompt"),
    (dict(stop_tokens=[500]), "stop token"),
])
def test_invalid_values_raise_before_any_jit(pair, kw, match):
    _, ours = pair
    args = dict(prompts=[[1, 2, 3], [4]], max_new_tokens=4)
    args.update(kw)
    before = sampler.compiled_programs()
    with pytest.raises(ValueError, match=match):
        mj.generate(ours, args.pop("prompts"), **args)
    assert sampler.compiled_programs() == before
