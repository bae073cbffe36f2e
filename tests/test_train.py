"""Training: losses and gradients against HF transformers, the optimizer step, exact resume, the CLI."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax import train as tr
from mixtral_jax.corpus import DOMAINS, SPLITS, build_corpus, load_corpus, prose_of, unigram_loss, without_docstrings
from conftest import GQA, hf_model
from tolerances import AUX_ATOL, GRAD_TOL, LOGITS_ATOL

TINY = GQA.replace(n_layers=2)


@pytest.mark.parametrize("masked", [False, True])
def test_aux_loss_equals_hf_load_balancing_loss(rng, masked):
    import torch
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = rng.standard_normal((3, 2, 9, 8)).astype(np.float32) * 2  # [L, B, T, E]
    mask = (np.arange(9)[None, :] < np.array([[9], [5]])).astype(np.int64) if masked else None
    ref = load_balancing_loss_func(tuple(torch.as_tensor(layer.reshape(-1, 8)) for layer in logits), 8, 2,
                                   None if mask is None else torch.as_tensor(mask))
    ours = tr.load_balancing_loss(jnp.asarray(logits), 2, None if mask is None else jnp.asarray(mask))
    assert abs(float(ours) - float(ref)) <= AUX_ATOL
    assert abs(float(ours) - 2.0) > 0.01  # unbalanced logits: not the balanced value k


@pytest.mark.parametrize("strategy", ["ragged", "blocked", None])
def test_loss_and_gradients_equal_hf(tmp_path, rng, strategy):
    """CE + coef * aux and its gradient for every parameter, against HF's loss.backward(), with each
    differentiable MoE strategy and the platform's default."""
    import torch

    model = hf_model(TINY, std=0.1)
    model.save_pretrained(tmp_path / "weights")
    params = mj.load(tmp_path / "weights", dtype="float32", layout="stacked").params
    tokens = rng.integers(0, TINY.vocab_size, (2, 13))

    model.train()  # dropout is 0 in the config; train() only re-enables autograd paths
    t = torch.as_tensor(tokens, dtype=torch.long)
    out = model(t[:, :-1], labels=t[:, 1:], shift_labels=t[:, 1:].contiguous(), output_router_logits=True)
    out.loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.grad)
    model.save_pretrained(tmp_path / "grads")
    ref_grads = mj.load(tmp_path / "grads", dtype="float32", layout="stacked").params

    tc = tr.TrainConfig(moe_strategy=strategy)
    lengths = jnp.full((2,), 13, jnp.int32)
    loss_and_grad = jax.jit(jax.value_and_grad(tr.loss_fn, has_aux=True), static_argnums=(1, 2))
    (loss, metrics), grads = loss_and_grad(params, TINY, tc, jnp.asarray(tokens), lengths)
    assert abs(float(loss) - out.loss.item()) <= LOGITS_ATOL
    assert abs(float(metrics["aux"]) - out.aux_loss.item()) <= AUX_ATOL
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(flat_ref[path]), atol=GRAD_TOL, rtol=GRAD_TOL,
                                   err_msg=jax.tree_util.keystr(path))
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3  # gradients are not trivial


def test_z_loss_gradient_matches_finite_differences(rng):
    logits = jnp.asarray(rng.standard_normal((2, 1, 5, 8)), jnp.float32)
    direction = jnp.asarray(rng.standard_normal(logits.shape), jnp.float32)
    grad = jax.grad(tr.router_z_loss)(logits)
    eps = 1e-2
    numeric = (tr.router_z_loss(logits + eps * direction) - tr.router_z_loss(logits - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(float(jnp.vdot(grad, direction)), float(numeric), rtol=1e-3)


def test_one_step_equals_a_hand_rolled_adamw_step(rng):
    tc = tr.TrainConfig(learning_rate=1e-2, warmup_steps=0, steps=10, grad_clip=0.5, weight_decay=0.1)
    state = tr.init_state(TINY, tc)
    params = jax.tree.map(np.asarray, state.params)
    tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (2, 9)), jnp.int32)
    lengths = jnp.asarray([9, 6], jnp.int32)
    grads = jax.jit(jax.grad(lambda p: tr.loss_fn(p, TINY, tc, tokens, lengths)[0]))(state.params)
    grads = jax.tree.map(np.asarray, grads)
    norm = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in jax.tree.leaves(grads)))
    scale = min(1.0, tc.grad_clip / norm)
    assert scale < 1.0  # the clip is exercised

    def adamw(p, g):
        g = g * scale
        m, v = (1 - tc.b1) * g, (1 - tc.b2) * g * g
        m_hat, v_hat = m / (1 - tc.b1), v / (1 - tc.b2)
        update = m_hat / (np.sqrt(v_hat) + 1e-8) + (tc.weight_decay * p if p.ndim > 1 else 0.0)
        return p - tc.learning_rate * update

    expected = jax.tree.map(adamw, params, grads)
    new_state, metrics = tr.train_step_jit(TINY, tc, state, tokens, lengths)
    assert int(new_state.step) == 1 and abs(float(metrics["lr"]) - tc.learning_rate) < 1e-9
    for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-6, rtol=1e-5)


def fake_corpus(vocab_size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {(s, d): rng.integers(1, vocab_size, 4000).astype(np.int32) for s in SPLITS for d in DOMAINS}


class InterruptAt(dict):
    """A corpus that raises KeyboardInterrupt (as Ctrl-C would) on its n-th training lookup."""

    def __init__(self, corpus, n):
        super().__init__(corpus)
        self.calls, self.n = 0, n

    def __getitem__(self, key):
        if key[0] == "train":
            self.calls += 1
            if self.calls == self.n:
                raise KeyboardInterrupt
        return super().__getitem__(key)


def test_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path):
    tc = tr.TrainConfig(steps=6, batch_size=2, seq_len=16, warmup_steps=2, log_every=1, eval_every=3,
                        eval_batches=1, save_every=100, keep=2)
    corpus = fake_corpus(TINY.vocab_size)
    straight = tr.train(TINY, tc, str(tmp_path / "a"), corpus, progress=False)["history"]
    first = tr.train(TINY, tc, str(tmp_path / "b"), corpus, progress=False, stop_after=3)["history"]
    second = tr.train(TINY, tc, str(tmp_path / "b"), corpus, progress=False)["history"]
    assert [r["step"] for r in first + second] == list(range(1, 7))
    assert [r["loss"] for r in first + second] == [r["loss"] for r in straight]
    assert straight[-1]["loss"] < straight[0]["loss"]

    # Ctrl-C during step 5 (batch_size lookups per step): saves step 4, resumes exactly.
    with pytest.raises(KeyboardInterrupt):
        tr.train(TINY, tc, str(tmp_path / "c"), InterruptAt(corpus, 4 * tc.batch_size + 1), progress=False)
    resumed = tr.train(TINY, tc, str(tmp_path / "c"), corpus, progress=False)["history"]
    assert [r["step"] for r in resumed] == [5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight[4:]]
    lines = [json.loads(x) for x in open(tmp_path / "c" / tr.METRICS_FILE)]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 7))
    record = lines[-2] if "eval" in lines[-1] else lines[-1]
    assert np.allclose(np.sum(record["expert_load"], axis=1), 1.0) and len(record["routing_entropy"]) == 2
    assert set(lines[-1]["eval"]) == set(DOMAINS)

    with pytest.raises(ValueError, match="seed"):
        tr.train(TINY, tc.__class__(**{**tc.__dict__, "seed": 1}), str(tmp_path / "b"), corpus, progress=False)


def test_data_parallel_step_equals_one_device():
    """The train step on a data=2 mesh (host devices) gives the one-device losses."""
    code = """
import os, json, numpy as np
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, mixtral_jax as mj
from mixtral_jax import train as tr
from test_train import TINY, fake_corpus
tc = tr.TrainConfig(steps=2, batch_size=4, seq_len=8, warmup_steps=1)
corpus, out = fake_corpus(TINY.vocab_size), []
for mesh in (None, mj.make_mesh(data=2)):
    state = tr.init_state(TINY, tc, mesh)
    place = tr._placer(tc, mesh)
    for step in range(2):
        tokens = tr.batch_at(corpus, "train", step, tc)
        state, m = tr.train_step_jit(TINY, tc, state, *place(tokens, np.full((4,), 9, np.int32)))
        out.append(float(m["loss"]))
print(json.dumps(out))
"""
    import os

    here = os.path.dirname(__file__)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=here,
                          env=dict(os.environ, PYTHONPATH=here), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(losses[:2], losses[2:], rtol=1e-5)


def test_corpus_split_by_file_and_domains(tmp_path):
    lib = tmp_path / "lib"
    (lib / "pkg").mkdir(parents=True)
    (lib / "tests").mkdir()
    (lib / "tests" / "test_x.py").write_text("assert True\n")
    for i in range(40):
        (lib / "pkg" / f"m{i}.py").write_text(
            f'"""Module {i}: a docstring long enough to count as prose for the corpus builder, honestly."""\n'
            f"# A comment line that says what the function below does, in words.\n"
            f"# It continues on a second line to make a block longer than eighty characters.\n"
            f"def f{i}(x):\n    return x + {i}\n")
    tok = mj.Tokenizer()
    manifest = build_corpus(str(tmp_path / "corpus"), tokenizer=tok, stdlib=str(lib), val_percent=20, math_docs=10)
    corpus = load_corpus(str(tmp_path / "corpus"))
    assert 0 < len(manifest["val_files"]) < 40 and not any("tests" in f for f in manifest["val_files"])
    for s in SPLITS:
        for d in DOMAINS:
            assert manifest["tokens"][s][d] == len(corpus[s, d]) > 0
    assert "def f" in tok.decode(corpus["train", "code"][:100].tolist())
    assert "docstring long enough" in prose_of((lib / "pkg" / "m1.py").read_text())
    assert "=" in tok.decode(corpus["val", "math"][:40].tolist())
    baseline = unigram_loss(corpus, tok.vocab_size)
    assert set(baseline) == set(DOMAINS) and all(v > 0 for v in baseline.values())

    stripped = build_corpus(str(tmp_path / "stripped"), tokenizer=tok, stdlib=str(lib), val_percent=20, math_docs=10,
                            strip_docstrings=True)
    plain_corpus, stripped_corpus = corpus, load_corpus(str(tmp_path / "stripped"))
    assert "docstring long enough" not in tok.decode(stripped_corpus["train", "code"].tolist())
    assert "def f" in tok.decode(stripped_corpus["train", "code"][:100].tolist())
    for key in [("val", d) for d in DOMAINS] + [("train", "prose"), ("train", "math")]:  # only training code changes
        assert np.array_equal(stripped_corpus[key], plain_corpus[key]), key
    assert stripped["recipe"]["strip_docstrings"] is True
    with pytest.raises(ValueError, match="docstrings"):
        build_corpus(str(tmp_path / "stripped"), tokenizer=tok, stdlib=str(lib))


@pytest.mark.parametrize("source, expected", [
    ('"""Module."""\nimport os\n', "import os\n"),
    ('def f():\n    """Only a docstring."""\n', "def f():\n    pass\n"),
    ('class A:\n    """Two\n    lines."""\n    x = 1  # kept\n', "class A:\n    x = 1  # kept\n"),
    ('def g(): """same line"""\n', 'def g(): """same line"""\n'),           # shares its line: kept
    ("def broken(:\n", "def broken(:\n"),                                      # does not parse: unchanged
])
def test_without_docstrings(source, expected):
    assert without_docstrings(source) == expected


def test_corpus_packages_add_training_code_without_held_out_copies(tmp_path, monkeypatch):
    """Installed packages feed the training split only; their tests and vendored folders are
    skipped, and copies of held-out stdlib files (exact or edited) are dropped."""
    lib, site = tmp_path / "lib", tmp_path / "site"
    lib.mkdir()
    held_out_body = "".join(f"    value_{j} = compute_something_long({j}, argument_{j})\n" for j in range(30))
    for i in range(20):
        (lib / f"m{i}.py").write_text(f"def f{i}(x):\n{held_out_body}    return x + {i}\n")
    tok = mj.Tokenizer()
    plain = build_corpus(str(tmp_path / "plain"), tokenizer=tok, stdlib=str(lib), val_percent=30, math_docs=5)
    held = plain["val_files"][0]
    pkg = site / "fakepkg"
    for folder in ("", "tests", "_vendor", "sub"):
        (pkg / folder).mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text('"""A fake package whose module docstring is long enough to count as prose in the corpus, surely enough."""\n')
    (pkg / "sub" / "tool.py").write_text("def tool(a, b):\n    return sorted(a) + list(b)\n" * 3)
    (pkg / "sub" / "copy.py").write_text((lib / held).read_text())                 # exact copy
    (pkg / "sub" / "edited.py").write_text("# vendored\n" + (lib / held).read_text().replace("x + ", "x - "))
    (pkg / "tests" / "test_tool.py").write_text("assert tool([2, 1], [3]) == [1, 2, 3]\n")
    (pkg / "_vendor" / "other.py").write_text("VENDORED = True\n")
    monkeypatch.syspath_prepend(str(site))
    manifest = build_corpus(str(tmp_path / "more"), tokenizer=tok, stdlib=str(lib), val_percent=30, math_docs=5,
                            packages=("fakepkg",))
    used = manifest["packages"]["fakepkg"]
    assert sorted(used["files"]) == ["fakepkg/__init__.py", "fakepkg/sub/tool.py"]
    assert used["near_duplicates_dropped"] == ["fakepkg/sub/edited.py"] and used["exact_duplicates_dropped"] == 1
    assert manifest["val_files"] == plain["val_files"] and manifest["tokens"]["val"] == plain["tokens"]["val"]
    assert manifest["tokens"]["train"]["code"] == plain["tokens"]["train"]["code"] + used["code_tokens"]
    assert manifest["tokens"]["train"]["prose"] > plain["tokens"]["train"]["prose"]
    capped = build_corpus(str(tmp_path / "capped"), tokenizer=tok, stdlib=str(lib), val_percent=30, math_docs=5,
                          packages=("fakepkg",), max_package_tokens=1)
    assert len(capped["packages"]["fakepkg"]["files"]) == 1
    with pytest.raises(ValueError, match="other packages"):
        build_corpus(str(tmp_path / "more"), tokenizer=tok, stdlib=str(lib), packages=("fakepkg", "json"))
    assert build_corpus(str(tmp_path / "more"), tokenizer=tok)["tokens"] == manifest["tokens"]  # as built
    with pytest.raises(ValueError, match="not installed"):
        build_corpus(str(tmp_path / "none"), tokenizer=tok, stdlib=str(lib), packages=("no_such_package_here",))


def test_train_cli_runs_and_writes_a_loadable_model(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    for i in range(10):
        (lib / f"m{i}.py").write_text(f"def f{i}(x):\n    '''Add {i}.'''\n    return x + {i}\n")
    build_corpus(str(tmp_path / "corpus"), stdlib=str(lib), val_percent=30, math_docs=5)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(mj.MixtralConfig.tiny().replace(vocab_size=32000, max_seq_len=64).to_dict()))
    cmd = [sys.executable, "-m", "mixtral_jax.cli", "train", str(tmp_path / "run"), "--config", str(config),
           "--corpus", str(tmp_path / "corpus"), "--steps", "2", "--batch-size", "2", "--seq-len", "16",
           "--warmup", "1", "--eval-every", "2", "--log-every", "1", "--export-dtype", "bfloat16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["steps"] == 2 and set(summary["eval"]) == set(DOMAINS)
    model = mj.load(summary["model"])
    assert model.config.vocab_size == 32000 and model.tokenizer is not None

    bad = subprocess.run(cmd[:5] + ["--steps", "0", "--corpus", str(tmp_path / "corpus")], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "steps" in bad.stderr


SMALL_WIDTH = mj.MixtralConfig(vocab_size=512, d_model=256, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=32,
                               d_ff=896, n_experts=8, top_k=2, max_seq_len=128)  # the small config's shape, narrower


def test_remat_same_loss_and_gradients_less_memory(rng):
    tokens = jnp.asarray(rng.integers(0, SMALL_WIDTH.vocab_size, (4, 65)), jnp.int32)
    lengths = jnp.asarray([65, 65, 40, 65], jnp.int32)
    params = mj.init_params(SMALL_WIDTH, seed=2)
    results, temp = {}, {}
    for remat in ("none", "layer", "dots"):
        tc = tr.TrainConfig(remat=remat)
        fn = jax.jit(jax.value_and_grad(lambda p: tr.loss_fn(p, SMALL_WIDTH, tc, tokens, lengths)[0]))
        results[remat] = fn(params)
        temp[remat] = fn.lower(params).compile().memory_analysis().temp_size_in_bytes
    for remat in ("layer", "dots"):
        assert abs(float(results[remat][0]) - float(results["none"][0])) <= 1e-6
        for g, r in zip(jax.tree.leaves(results[remat][1]), jax.tree.leaves(results["none"][1])):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-6, rtol=1e-5)
    assert temp["layer"] < temp["none"] and temp["dots"] < temp["none"], temp


def test_gradient_accumulation_equals_one_larger_batch(rng):
    config = TINY.replace(router_aux_loss_coef=0.0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (8, 12)), jnp.int32)
    lengths = jnp.asarray([12, 9, 12, 5, 12, 12, 7, 12], jnp.int32)  # unequal targets per micro-batch
    one = tr.TrainConfig(batch_size=8, grad_accum=1, learning_rate=1e-2, warmup_steps=0, steps=5)
    four = tr.TrainConfig(batch_size=2, grad_accum=4, learning_rate=1e-2, warmup_steps=0, steps=5)
    params = mj.init_params(config, seed=4)
    grads = jax.jit(tr.accumulated_grads, static_argnums=(0, 1))
    ga, ma = grads(config, one, params, tokens, lengths)
    gb, mb = grads(config, four, params, tokens, lengths)
    assert abs(float(ma["loss"]) - float(mb["loss"])) <= 1e-5 and abs(float(ma["ce"]) - float(mb["ce"])) <= 1e-5
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ga)) > 1e-3
    state, m = tr.train_step_jit(config, four, tr.init_state(config, four, params=params), tokens, lengths)
    assert abs(float(m["loss"]) - float(ma["loss"])) <= 1e-5 and int(state.step) == 1
    corpus = fake_corpus(config.vocab_size)
    np.testing.assert_array_equal(tr.batch_at(corpus, "train", 3, four, rows=8), tr.batch_at(corpus, "train", 3, one))
