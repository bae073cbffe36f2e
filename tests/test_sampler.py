"""generate / generate_stream: HF greedy parity, filters vs numpy references, seeds, stops, compiles."""

import jax
import jax.numpy as jnp
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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_greedy_is_argmax_with_ties_nans_and_infinities(dtype):
    rng = np.random.default_rng(3)
    rows = [rng.standard_normal(300), rng.integers(-2, 3, 300).astype(float)]  # random; many ties
    for special in ([np.nan], [np.nan, np.nan], [np.inf], [np.inf, np.inf], [-np.inf]):
        row = rng.integers(-2, 3, 300).astype(float)
        row[rng.choice(300, len(special), replace=False)] = special
        rows.append(row)
    rows += [np.full(300, -np.inf), np.full(300, np.nan), np.array([-0.0, 0.0] * 150), np.array([0.0, -0.0] * 150)]
    logits = jnp.asarray(np.stack(rows), dtype)
    got = jax.jit(sampler.greedy)(logits)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(logits, axis=-1)))


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

def params_of(n, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
              frequency_penalty=0.0):
    """Per-row SamplingParams with every row set alike."""
    return sampler.SamplingParams(
        np.full(n, temperature, np.float32), np.full(n, top_k, np.int32), np.full(n, top_p, np.float32),
        np.full(n, min_p, np.float32), np.full(n, repetition_penalty, np.float32),
        np.full(n, presence_penalty, np.float32), np.full(n, frequency_penalty, np.float32))


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
    p = params_of(6, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    got = np.asarray(sampler.filter_logits(logits, p))
    for row in range(6):
        ref = np_filter(logits[row].astype(np.float64), temperature, top_k, top_p, min_p)
        kept = np.isfinite(ref)
        np.testing.assert_array_equal(got[row] > np.finfo(np.float32).min, kept)
        np.testing.assert_allclose(got[row][kept], ref[kept], rtol=1e-6)
    assert (got > np.finfo(np.float32).min).sum() < got.size or (top_k, top_p, min_p) == (0, 1.0, 0.0)


def test_sort_floats_equals_numpy_sort(rng):
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.finfo(np.float32).min, np.finfo(np.float32).max,
                        np.finfo(np.float32).tiny, -np.finfo(np.float32).tiny, 1e-45, -1e-45, 1.0, 1.0, -1.0],
                       np.float32)
    x = np.concatenate([(rng.standard_normal((3, 500)) * 10).astype(np.float32), np.tile(special, (3, 1))], axis=1)
    got = np.asarray(sampler.sort_floats(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.sort(x, axis=-1))
    assert np.signbit(got[0][got[0] == 0]).tolist() == [True, False]          # -0.0 first


def test_filters_per_row_settings_match_numpy_reference(rng):
    """Rows with different filters in one batch (one sort serves top-k and top-p for every row)."""
    settings = [(1.0, 5, 1.0, 0.0), (0.8, 0, 0.7, 0.0), (1.2, 0, 1.0, 0.0), (1.0, 40, 0.6, 0.05), (0.0, 0, 1.0, 0.0)]
    logits = (rng.standard_normal((len(settings), 300)) * 3).astype(np.float32)
    p = sampler.SamplingParams(*(jnp.asarray([s[i] for s in settings], dt) for i, dt in (
        (0, jnp.float32), (1, jnp.int32), (2, jnp.float32), (3, jnp.float32))),
        *(jnp.full((len(settings),), v, jnp.float32) for v in (1.0, 0.0, 0.0)))
    got = np.asarray(sampler.filter_logits(logits, p))
    for row, (temperature, top_k, top_p, min_p) in enumerate(settings):
        ref = np_filter(logits[row].astype(np.float64), temperature, top_k, top_p, min_p)
        kept = np.isfinite(ref)
        np.testing.assert_array_equal(got[row] > np.finfo(np.float32).min, kept)
        np.testing.assert_allclose(got[row][kept], ref[kept], rtol=1e-6)


def test_samples_follow_the_filtered_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    p = params_of(1, temperature=1.0, top_p=0.7)
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
    for kw in (dict(temperature=0.7), dict(temperature=1.3, top_p=0.5), dict(seed=9, top_k=3, min_p=0.1),
               dict(repetition_penalty=1.3), dict(presence_penalty=-1.5, frequency_penalty=0.7),
               dict(temperature=0.8, repetition_penalty=0.9, frequency_penalty=2.0)):
        mj.generate(ours, [[5] * 40], max_new_tokens=2, stop_tokens=[], **kw)
    assert sampler.compiled_programs() == before


@pytest.mark.parametrize("kw, match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(min_p=1.5), "min_p"), (dict(min_p=-0.1), "min_p"), (dict(seed=-1), "seed"),
    (dict(prompts=[[]]), "empty"), (dict(prompts=[]), "non-empty"), (dict(prompts=[[1, 101]]), "out of range"),
    (dict(prompts=[[1] * 1000], max_new_tokens=30), "exceeds the context"),
    (dict(prompts=["text"]), "tokenizer"), (dict(temperature=[0.5, 0.5, 0.5]), "one value per prompt"),
    (dict(stop_tokens=[500]), "stop token"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"), (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-2.01), "frequency_penalty"), (dict(frequency_penalty=float("nan")), "frequency_penalty"),
])
def test_invalid_values_raise_before_any_jit(pair, kw, match):
    _, ours = pair
    args = dict(prompts=[[1, 2, 3], [4]], max_new_tokens=4)
    args.update(kw)
    before = sampler.compiled_programs()
    with pytest.raises(ValueError, match=match):
        mj.generate(ours, args.pop("prompts"), **args)
    assert sampler.compiled_programs() == before


# ---- penalties: HF's repetition penalty, OpenAI's presence and frequency penalties ----

@pytest.mark.parametrize("penalty", [1.0, 1.3, 0.7])
def test_repetition_penalty_equals_hf_logits_processor(rng, penalty):
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = (rng.standard_normal((3, 200)) * 3).astype(np.float32)
    history = [rng.integers(0, 200, n) for n in (1, 17, 60)]        # prompt + output so far, per row
    counts = np.zeros((3, 200), np.int32)
    in_prompt = np.zeros((3, 200), bool)
    for r, ids in enumerate(history):                               # first half prompt, rest generated
        in_prompt[r, ids[:len(ids) // 2 + 1]] = True
        np.add.at(counts[r], ids[len(ids) // 2 + 1:], 1)
    got = np.asarray(sampler.apply_penalties(logits, params_of(3, repetition_penalty=penalty), counts, in_prompt))
    proc = RepetitionPenaltyLogitsProcessor(penalty)
    for r, ids in enumerate(history):
        ref = proc(torch.as_tensor(ids[None]), torch.as_tensor(logits[r:r + 1])).numpy()[0]
        np.testing.assert_allclose(got[r], ref, rtol=1e-6)
    assert (penalty == 1.0) == np.array_equal(got, logits)


def test_presence_and_frequency_penalties_equal_the_openai_formula(rng):
    logits = (rng.standard_normal((2, 50)) * 2).astype(np.float32)
    counts = rng.integers(0, 4, (2, 50)).astype(np.int32) * (rng.random((2, 50)) < 0.3)
    in_prompt = rng.random((2, 50)) < 0.5                           # ignored by both penalties
    p = sampler.SamplingParams(*(np.asarray(v, dt) for v, dt in (
        ([1.0, 1.0], np.float32), ([0, 0], np.int32), ([1.0, 1.0], np.float32), ([0.0, 0.0], np.float32),
        ([1.0, 1.0], np.float32), ([0.6, -1.2], np.float32), ([0.4, 1.9], np.float32))))
    got = np.asarray(sampler.apply_penalties(logits, p, counts, in_prompt))
    presence, frequency = np.array([[0.6], [-1.2]]), np.array([[0.4], [1.9]])
    ref = logits - frequency * counts - presence * (counts > 0)     # OpenAI's documented formula
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_greedy_with_repetition_penalty_equals_hf_generate(pair):
    """The penalty inside the jitted loop over prompt and output, against HF end to end."""
    import torch

    hf, ours = pair
    for prompt in prompts_of([1, 9, 30], seed=3):
        got = mj.generate(ours, [prompt], max_new_tokens=40, repetition_penalty=1.5, stop_tokens=[])[0]
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                              repetition_penalty=1.5, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert got == ref
        assert got != mj.generate(ours, [prompt], max_new_tokens=40, stop_tokens=[])[0]


def test_greedy_with_openai_penalties_equals_a_numpy_loop(pair):
    """Greedy decoding over penalised logits, step by step from our uncached forward pass."""
    _, ours = pair
    prompts = prompts_of([4, 12], seed=5)
    presence, frequency = [0.8, -0.5], [0.5, 1.5]
    got = mj.generate(ours, prompts, max_new_tokens=20, presence_penalty=presence, frequency_penalty=frequency,
                      stop_tokens=[])
    width = max(map(len, prompts)) + 20  # one padded shape: one compiled program for every step
    for r, prompt in enumerate(prompts):
        seq, counts = list(prompt), np.zeros(CONFIG.vocab_size)
        for _ in range(20):
            padded = np.zeros((1, width), np.int32)
            padded[0, :len(seq)] = seq
            logits = np.asarray(mj.forward(ours.config, ours.params, padded, lengths=[len(seq)]))
            logits = logits[0, len(seq) - 1].astype(np.float64)
            token = int(np.argmax(logits - frequency[r] * counts - presence[r] * (counts > 0)))
            counts[token] += 1
            seq.append(token)
        assert got[r] == seq[len(prompt):]
    assert got != mj.generate(ours, prompts, max_new_tokens=20, stop_tokens=[])


def test_neutral_penalties_change_no_token(pair):
    _, ours = pair
    prompts = prompts_of([3, 17, 40], seed=8)
    for kw in (dict(), dict(temperature=1.1, top_k=40, seed=[1, 2, 3])):
        plain = mj.generate(ours, prompts, max_new_tokens=24, stop_tokens=[], **kw)
        neutral = mj.generate(ours, prompts, max_new_tokens=24, stop_tokens=[], repetition_penalty=1.0,
                              presence_penalty=0.0, frequency_penalty=0.0, **kw)
        assert neutral == plain


def test_penalties_act_per_row_and_in_the_stream(pair):
    _, ours = pair
    prompts = prompts_of([5, 7], seed=9)
    kw = dict(max_new_tokens=16, repetition_penalty=[1.0, 1.6], frequency_penalty=[1.0, 0.0], stop_tokens=[])
    batched = mj.generate(ours, prompts, **kw)
    for r in range(2):
        alone = mj.generate(ours, [prompts[r]], max_new_tokens=16, repetition_penalty=[kw["repetition_penalty"][r]],
                            frequency_penalty=[kw["frequency_penalty"][r]], stop_tokens=[])[0]
        assert batched[r] == alone
    steps = list(mj.generate_stream(ours, prompts, **kw))
    assert [[s[r] for s in steps] for r in range(2)] == batched
