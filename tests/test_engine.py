"""The serving engine in process (no HTTP): its steps against `mj.generate` and the decoder's
segments against separate calls."""

import threading

import jax.numpy as jnp
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax.kvcache import init_cache
from mixtral_jax.model import Segment, decoder, decoder_segments
from mixtral_jax.serving import engine as engine_lib
from mixtral_jax.serving.engine import Engine, Options
from tolerances import CACHE_ATOL


@pytest.fixture(scope="module")
def model():
    config = mj.MixtralConfig.tiny().replace(max_seq_len=300)
    return mj.Model(config, mj.init_params(config, seed=5))


def test_segments_equal_separate_calls(model):
    """A decode segment over every cache row plus a prompt chunk written into one row (`rows`), in one
    pass, equal the two run as separate decoder calls; untouched rows stay as they were."""
    config, params = model.config, model.params
    rng = np.random.default_rng(0)
    n, s = 3, 64
    cache = init_cache(config, n, s)
    prompts = jnp.asarray(rng.integers(3, config.vocab_size, (n, 20)), jnp.int32)
    _, cache, _, _ = decoder(config, params, prompts, jnp.asarray([20, 12, 7]), cache)
    last = jnp.asarray(rng.integers(3, config.vocab_size, (n, 1)), jnp.int32)
    live = jnp.asarray([1, 0, 1], jnp.int32)           # row 1 is reading a prompt instead
    chunk = jnp.asarray(rng.integers(3, config.vocab_size, (1, 16)), jnp.int32)
    n_chunk, row = jnp.asarray([11]), jnp.asarray([1])

    hidden, both, logits, _ = decoder_segments(config, params, [Segment(last, live), Segment(chunk, n_chunk, row)],
                                               cache)
    h_dec, after_dec, l_dec, _ = decoder(config, params, last, live, cache)
    h_chunk, after_chunk, l_chunk, _ = decoder(config, params, chunk, n_chunk, after_dec, cache_rows=row)

    tol = {"atol": CACHE_ATOL, "rtol": 0}
    np.testing.assert_allclose(np.asarray(hidden[0])[[0, 2]], np.asarray(h_dec)[[0, 2]], **tol)
    np.testing.assert_allclose(np.asarray(hidden[1])[:, :11], np.asarray(h_chunk)[:, :11], **tol)
    np.testing.assert_allclose(np.asarray(logits[1])[:, :, :11], np.asarray(l_chunk)[:, :, :11], **tol)
    np.testing.assert_array_equal(np.asarray(both["lengths"]), [21, 12 + 11, 8])
    for name in both:
        if name != "lengths":
            for key in ("k", "v"):
                np.testing.assert_allclose(np.asarray(both[name][key]), np.asarray(after_chunk[name][key]), **tol)
    # the chunk went into row 1 only, after its 12 cached tokens, and row 1's own keys equal a
    # one-row cache's
    solo = init_cache(config, 1, s)
    _, solo, _, _ = decoder(config, params, prompts[1:2], jnp.asarray([12]), solo)
    _, solo, _, _ = decoder(config, params, chunk, n_chunk, solo)
    np.testing.assert_allclose(np.asarray(both["layers_0"]["k"][1, :23]), np.asarray(solo["layers_0"]["k"][0, :23]),
                               **tol)


def _run(engine, prompts, budgets, options):
    """Submit all at once; wait (bounded) for every request; their token lists."""
    done = [threading.Event() for _ in prompts]
    reqs = [engine.submit(p, Options(max_new_tokens=b, **options), lambda e, d=d: d.set() if e.finish_reason else None)
            for p, b, d in zip(prompts, budgets, done)]
    for d in done:
        assert d.wait(300), "a request did not finish"
    return [r.tokens for r in reqs]


@pytest.mark.parametrize("options", [{}, {"temperature": 0.9, "top_k": 20, "seed": 7, "repetition_penalty": 1.3}])
def test_engine_equals_generate_with_chunks_and_mixed_steps(model, options):
    """More requests than slots, prompts longer than a chunk (read in several steps while other slots
    decode): each request's tokens equal `generate`'s for it alone, greedy and sampled."""
    rng = np.random.default_rng(1)
    lengths = [5, 70, 33, 17, 100, 2]
    prompts = [[1] + rng.integers(3, model.config.vocab_size, n - 1).tolist() for n in lengths]
    budgets = [9, 4, 12, 1, 7, 10]
    engine = Engine(model, slots=3, max_seq_len=160, prefill_chunk=32, stop_tokens=[])
    engine.start()
    try:
        got = _run(engine, prompts, budgets, options)
    finally:
        engine.shutdown()
    sampling = {k: v for k, v in options.items() if k != "seed"}
    for prompt, budget, tokens in zip(prompts, budgets, got):
        want = mj.generate(model, [prompt], max_new_tokens=budget, stop_tokens=[], seed=options.get("seed", 0),
                           **sampling)[0]
        assert tokens == list(want)


def test_short_prompts_waiting_together_share_a_step(model):
    """Prompts with at most PACK_CHUNK tokens left that wait together are read in one step while
    another slot decodes (three take the four-piece program with a padding piece, none of whose
    writes may land), and each request's tokens still equal `generate`'s for it alone."""
    rng = np.random.default_rng(2)
    lengths = [130, 40, 5, 64]
    prompts = [[1] + rng.integers(3, model.config.vocab_size, n - 1).tolist() for n in lengths]
    budgets = [30, 6, 9, 3]
    engine = Engine(model, slots=4, max_seq_len=200, prefill_chunk=64, stop_tokens=[])
    steps = []
    call = engine._call

    def spy(op, **kw):
        if op == "prefill" and threading.current_thread().name == "mixtral-jax-engine":
            steps.append(len(kw["pieces"]))
        return call(op, **kw)

    engine._call = spy
    done = [threading.Event() for _ in prompts]
    streaming = threading.Event()

    def submit(i):
        def on_event(e):
            if e.token is not None:
                streaming.set()
            if e.finish_reason:
                done[i].set()
        return engine.submit(prompts[i], Options(max_new_tokens=budgets[i]), on_event)

    reqs = [submit(0)]
    engine.start()
    try:
        assert streaming.wait(300), "the long prompt never started decoding"
        with engine._lock:                                  # the three arrive together
            reqs += [submit(i) for i in (1, 2, 3)]
        for d in done:
            assert d.wait(300), "a request did not finish"
    finally:
        engine.shutdown()
    assert 3 in steps and max(steps) <= engine_lib.PACK_SIZES[-1]
    for prompt, budget, req in zip(prompts, budgets, reqs):
        assert req.tokens == list(mj.generate(model, [prompt], max_new_tokens=budget, stop_tokens=[])[0])


def test_multi_host_calls_round_trip():
    """What process 0 broadcasts for a step with pieces is what the other processes rebuild."""
    calls = engine_lib._Calls(256, 8)
    sent = []
    calls._broadcast = lambda ints, floats: sent.append((ints, floats)) or (ints, floats)
    opts = [Options(max_new_tokens=5, temperature=0.5, top_k=3, top_p=0.75, seed=2**32 - 1, presence_penalty=-1.0),
            Options(max_new_tokens=7, repetition_penalty=1.2, seed=4)]
    pieces = [dict(slot=2, tokens=np.arange(64, dtype=np.int32), n_valid=40, start=0, options=opts[0], final=True),
              dict(slot=0, tokens=np.arange(64, 128, dtype=np.int32), n_valid=64, start=64, options=opts[1],
                   final=False)]
    calls.send("prefill", pieces=pieces)
    calls._broadcast = lambda ints, floats: sent[0]
    op, kw = calls.receive()
    assert op == "prefill" and len(kw["pieces"]) == 2
    for want, got in zip(pieces, kw["pieces"]):
        np.testing.assert_array_equal(got.pop("tokens"), want["tokens"])
        got_opts, want_opts = got.pop("options"), want["options"]
        assert got == {k: v for k, v in want.items() if k not in ("tokens", "options")}
        if want["final"]:
            assert got_opts == want_opts
        else:   # a piece that is not its prompt's last carries no budget
            assert got_opts.seed == want_opts.seed and got_opts.repetition_penalty == pytest.approx(1.2)
    for rows in (np.asarray([5, 0, 8, 8], np.int32), None):    # a step of some slots, then of all
        sent.clear()
        calls._broadcast = lambda ints, floats: sent.append((ints, floats)) or (ints, floats)
        calls.send("decode", rows=rows)
        calls._broadcast = lambda ints, floats: sent[0]
        op, kw = calls.receive()
        assert op == "decode" and (kw["rows"] is None if rows is None else kw["rows"].tolist() == rows.tolist())


def test_step_over_some_rows_equals_the_step_over_all(model):
    """A step without a chunk over some slots (`rows`, padded with an out-of-range index) gives
    those slots exactly what the step over every slot gives them, and leaves the others alone."""
    import jax

    engine = Engine(model, slots=4, max_seq_len=128, prefill_chunk=32, stop_tokens=[])
    engine._slots = engine._empty_slots()
    rng = np.random.default_rng(3)
    sampled = Options(max_new_tokens=20, temperature=0.8, top_p=0.9, repetition_penalty=1.3, seed=11)
    for slot, n, opts in ((0, 9, Options(max_new_tokens=20)), (2, 21, sampled), (3, 5, Options(max_new_tokens=20))):
        tokens = np.zeros(32, np.int32)
        tokens[:n] = [1] + rng.integers(3, model.config.vocab_size, n - 1).tolist()
        engine._device("prefill", pieces=[dict(slot=slot, tokens=tokens, n_valid=n, start=0, options=opts, final=True)])
    engine._device("release", slot=3)        # slot 3 stops, slot 1 never started: 0 and 2 decode
    step = jax.jit(engine_lib._step, static_argnums=(0,), static_argnames=("attention", "mesh"))
    args = (model.config, model.params)
    state = engine._slots
    for rows in ([0, 2], [2, 4]):            # both decoding slots; one of them and a padding row
        if rows == [2, 4]:
            state = state.replace(active=state.active.at[0].set(False))
        full_slots, full, _ = step(*args, state, engine.stop, None, None, attention="auto")
        part_slots, part, _ = step(*args, state, engine.stop, None, jnp.asarray(rows, jnp.int32), attention="auto")
        np.testing.assert_array_equal(np.asarray(part.live), np.asarray(full.live))
        live = np.asarray(full.live)
        assert live.sum() == len([r for r in rows if r < 4])
        for name in ("token", "done", "top_ids", "routing"):
            np.testing.assert_array_equal(np.asarray(getattr(part, name))[live], np.asarray(getattr(full, name))[live])
        for name in ("logprob", "top_logprobs"):
            np.testing.assert_allclose(np.asarray(getattr(part, name))[live], np.asarray(getattr(full, name))[live],
                                       atol=CACHE_ATOL, rtol=0)
        for name in ("last", "active", "n_new", "max_new", "seeds", "counts", "in_prompt"):
            np.testing.assert_array_equal(np.asarray(getattr(part_slots, name)), np.asarray(getattr(full_slots, name)))
        np.testing.assert_array_equal(np.asarray(part_slots.cache["lengths"]), np.asarray(full_slots.cache["lengths"]))
        for layer in (k for k in full_slots.cache if k != "lengths"):
            for key in ("k", "v"):
                np.testing.assert_allclose(np.asarray(part_slots.cache[layer][key]),
                                           np.asarray(full_slots.cache[layer][key]), atol=CACHE_ATOL, rtol=0)


def test_chunk_sizes_pad_a_little_or_split(model):
    """A prompt's rest goes in one padded chunk when little is wasted, else the largest that fits."""
    engine = Engine(model, slots=1, max_seq_len=300, prefill_chunk=256)
    sizes = {left: engine._chunk_size(left) for left in (1, 16, 17, 60, 100, 129, 192, 200, 256, 300)}
    assert sizes == {1: 16, 16: 16, 17: 32, 60: 64, 100: 128, 129: 128, 192: 256, 200: 256, 256: 256, 300: 256}
    assert all(engine._chunk_size(n) in engine._chunks() for n in range(1, 600))


def test_cache_rows_and_blocks(model):
    """The engine's cache is a whole number of attention blocks long (no per-call padding copy)."""
    config = model.config.replace(max_seq_len=600)
    engine = Engine(mj.Model(config, model.params), slots=2, max_seq_len=300, prefill_chunk=32)
    assert engine._empty_slots().cache["layers_0"]["k"].shape[1] == 512
    engine = Engine(model, slots=2, max_seq_len=280, prefill_chunk=32)      # a context of 300: up to it
    assert engine._empty_slots().cache["layers_0"]["k"].shape[1] == 300
