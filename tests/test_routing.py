"""Routing analysis figures against direct counts, interventions, and the routing/score CLI."""

import html.parser
import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax import moe as moe_lib
from mixtral_jax import routing
from mixtral_jax.checkpoint import save
from conftest import GQA
from tolerances import STRATEGY_ATOL

# The real tokenizer's vocabulary on a tiny body: texts can be analysed without a download.
VOCAB32K = GQA.replace(vocab_size=32000, n_layers=3, max_seq_len=64)


def test_figures_equal_direct_counts():
    rng = np.random.default_rng(0)
    logits = {d: rng.standard_normal((n, 8)) for d, n in (("code", 50), ("prose", 31))}
    logits["code"][10:20, 5] += 10  # a run of tokens sent to expert 5
    stats = routing.layer_stats([("code", logits["code"]), ("prose", logits["prose"])], 8)
    for d, lg in logits.items():
        s = stats["domains"][d]
        first = lg.argmax(-1)
        top2 = np.argsort(-lg, axis=-1)[:, :2]
        assert np.isclose(sum(s["top1_share"]), 1) and np.isclose(sum(s["top2_share"]), 1)
        assert s["top1_share"] == pytest.approx(np.bincount(first, minlength=8) / len(lg))
        same = sum(first[t] == first[t + 1] for t in range(len(lg) - 1)) / (len(lg) - 1)
        share = sum(bool(set(top2[t]) & set(top2[t + 1])) for t in range(len(lg) - 1)) / (len(lg) - 1)
        assert s["consecutive_same_top1"] == pytest.approx(same)
        assert s["consecutive_share_any"] == pytest.approx(share)
        assert 0 < s["routing_entropy"] < np.log(8)
    assert stats["domains"]["code"]["consecutive_same_top1"] > 9 / 49  # the run is counted
    coact = np.asarray(stats["coactivation"])
    assert np.allclose(coact, coact.T) and np.isclose(coact.sum(), 1) and np.all(np.diag(coact) == 0)


def test_random_baseline_is_13_over_28_and_matches_simulation():
    assert routing.random_share_any(8) == pytest.approx(13 / 28)
    rng = np.random.default_rng(1)
    sets = [set(rng.choice(8, 2, replace=False)) for _ in range(40000)]
    sim = np.mean([bool(a & b) for a, b in zip(sets[::2], sets[1::2])])
    assert abs(sim - 13 / 28) < 0.01


def test_parse_layers():
    assert routing.parse_layers("0,mid,last", 32) == [0, 16, 31]
    assert routing.parse_layers("-1,2", 4) == [3, 2]
    for bad in ("7", "x", ""):
        with pytest.raises(ValueError):
            routing.parse_layers(bad, 4)


@pytest.fixture(scope="module")
def model():
    return mj.Model(VOCAB32K, mj.init_params(VOCAB32K, seed=3), mj.Tokenizer())


def test_interventions_change_selection_not_gates(model, rng):
    layer = model.params["layers_0"]
    x = jnp.asarray(rng.standard_normal((30, VOCAB32K.d_model)), jnp.float32)
    base = moe_lib.route(x, layer["router"], 2)
    p = routing.intervene(model, disabled=[int(base.experts[0, 0])], forced=[6]).params["layers_0"]
    r = moe_lib.route(x, p["router"], 2, p["router_bias"])
    assert np.all(np.asarray(r.experts) != int(base.experts[0, 0])) and np.all((np.asarray(r.experts) == 6).any(-1))
    chosen = np.take_along_axis(np.asarray(base.logits), np.asarray(r.experts), -1)
    np.testing.assert_allclose(np.asarray(r.weights), np.exp(chosen) / np.exp(chosen).sum(-1, keepdims=True),
                               rtol=1e-5)
    # top-k 3 through the fast path equals the dense oracle with k = 3
    m3 = routing.intervene(model, top_k=3)
    tokens = rng.integers(0, 32000, (1, 20))
    np.testing.assert_allclose(np.asarray(mj.forward(m3.config, m3.params, tokens)),
                               np.asarray(mj.forward(m3.config, m3.params, tokens, moe_strategy="dense")),
                               atol=STRATEGY_ATOL * 10)
    with pytest.raises(ValueError):
        routing.intervene(model, disabled=[1], forced=[1])
    with pytest.raises(ValueError):
        routing.intervene(model, top_k=2, disabled=range(7))


def test_analyse_report_and_html(model):
    report = routing.analyse(model, [("code", "def f(x):\n    return x + 1\n" * 3), ("prose", "The cat sat. " * 8)],
                             layers=[0, 2])
    assert [layer["layer"] for layer in report["per_layer"]] == [0, 2]
    for layer in report["per_layer"]:
        for d in ("code", "prose"):
            assert np.isclose(sum(layer["domains"][d]["top1_share"]), 1)
    conc = routing.token_concentration(report, model.tokenizer, ["\u2581return", "\u2581nowhere"], "code")
    assert set(conc) == {"\u2581return"} and conc["\u2581return"]["count"] == 3
    assert all(1 / 8 <= share <= 1 for _, share in conc["\u2581return"]["layers"].values())
    rates = routing.word_piece_rates(report, model.tokenizer, "prose")
    n_prose = len(report["tokens"]["prose"][0])
    assert all(r["inside_pairs"] + r["across_pairs"] == n_prose - 1 for r in rates.values())
    page = routing.to_html(report, model.tokenizer)
    parser = html.parser.HTMLParser()
    parser.feed(page)
    assert page.count('class="t"') >= 2 * len(report["tokens"]["code"][0]) and "return" in page
    json.dumps(routing.summary(report))


def test_routing_and_score_cli(model, tmp_path):
    ckpt = tmp_path / "ckpt"
    save(ckpt, model.config, model.params)
    (tmp_path / "code.py").write_text("def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n")
    (tmp_path / "prose.txt").write_text("The quick brown fox jumps over the lazy dog. It was a sunny day.\n")
    cli = [sys.executable, "-m", "mixtral_jax.cli"]
    out_html, out_png = tmp_path / "r.html", tmp_path / "r.png"
    proc = subprocess.run(cli + ["routing", "--json", str(tmp_path / "code.py"), str(tmp_path / "prose.txt"),
                                 "--checkpoint", str(ckpt), "--html", str(out_html), "--plot", str(out_png)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert set(report["per_layer"][0]["domains"]) == {"code", "prose"} and report["layers"] == [0, 1, 2]
    assert report["random_baseline"]["consecutive_share_any"] == pytest.approx(13 / 28)
    html.parser.HTMLParser().feed(out_html.read_text())
    import matplotlib.image

    assert matplotlib.image.imread(str(out_png)).ndim == 3

    ppl = {}
    for flags in ([], ["--top-k", "1"], ["--disable-experts", "0,1"]):
        proc = subprocess.run(cli + ["score", str(tmp_path / "code.py"), "--json", "--checkpoint", str(ckpt)] + flags,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        ppl[" ".join(flags)] = json.loads(proc.stdout)["perplexity"]
    assert len(set(ppl.values())) == 3

    bad = subprocess.run(cli + ["score", str(tmp_path / "code.py"), "--checkpoint", str(ckpt), "--disable-experts",
                                "9"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "out of range" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
