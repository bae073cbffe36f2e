"""Long-context evaluations: passkey prompts, the passkey scorer, perplexity against context length."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax import evals, sampler
from conftest import GQA

CLI = [sys.executable, "-m", "mixtral_jax.cli"]


@pytest.fixture(scope="module")
def tok():
    return mj.Tokenizer()


@pytest.mark.parametrize("length", [120, 502, 1000, 4096, 32768])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_passkey_prompt_length_and_depth(tok, length, depth):
    ids = evals.passkey_prompt(tok, length, depth, 31415)
    assert ids[0] == tok.bos_id and abs(len(ids) - length) <= length / 100
    text = tok.decode(ids)
    lines = text.split("\n")
    assert lines[0] == evals.TASK and lines[2] == evals.KEY_LINE.format(key=31415) and lines[4] == evals.QUESTION
    before, after = (len(tok.encode(part, bos=False)) for part in (lines[1], lines[3]))
    assert abs(before / (before + after) - depth) <= 0.02 + 2 / (before + after)
    assert text.count("31415") == 2


def test_passkey_prompt_rejects_what_cannot_be_built(tok):
    with pytest.raises(ValueError, match="no room"):
        evals.passkey_prompt(tok, 30, 0.5, 1)
    with pytest.raises(ValueError, match="depth"):
        evals.passkey_prompt(tok, 500, 1.5, 1)


@pytest.mark.parametrize("text, value", [(" 4217. Remember", 4217), ("is 007", 7), ("no number here", None),
                                         ("-12 and 40", 12), ("", None), ("key: 50000!", 50000)])
def test_first_integer(text, value):
    assert evals.first_integer(text) == value


def test_passkey_scores_answers_through_a_fake_generate(tok, monkeypatch):
    """Answers: the key (right), another number (wrong), no number (wrong)."""
    config = GQA.replace(vocab_size=32000, max_seq_len=1024)
    model = mj.Model(config, params=None, tokenizer=tok)
    seen = []

    def fake_generate(model, prompts, **kw):
        out = []
        for ids in prompts:
            key = evals.first_integer(tok.decode(ids).split("\n")[2])
            seen.append((len(ids), kw["max_new_tokens"]))
            answer = [f" {key}. Done", f" {key + 1}.", " I do not know"][len(out) % 3]
            out.append(tok.encode(answer, bos=False))
        return out

    monkeypatch.setattr(sampler, "generate", fake_generate)
    result = evals.passkey(model, [300, 600], [0.0, 1.0], trials=3, seed=1)
    assert result["accuracy"] == [[1 / 3, 1 / 3], [1 / 3, 1 / 3]]
    assert result["lengths"] == [300, 600] and result["depths"] == [0.0, 1.0] and result["trials"] == 3
    assert all(n == evals.ANSWER_TOKENS for _, n in seen) and len(seen) == 12
    with pytest.raises(ValueError, match="out of range"):
        evals.passkey(model, [1020], [0.5])


def test_passkey_cli_on_the_demo_model_writes_json_and_png(tmp_path):
    png = tmp_path / "heat.png"
    proc = subprocess.run(CLI + ["passkey", "--lengths", "200,502", "--depths", "0,0.5,1", "--trials", "2",
                                 "--json", "--plot", str(png)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["lengths"] == [200, 502] and result["depths"] == [0, 0.5, 1] and result["trials"] == 2
    assert np.shape(result["accuracy"]) == (2, 3) and all(0 <= a <= 1 for row in result["accuracy"] for a in row)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run(CLI + ["passkey", "--lengths", "503"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "503" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_context_perplexity_equals_scoring_each_token_with_c_tokens_before_it(rng):
    config = GQA.replace(max_seq_len=512)
    params = jax.tree.map(lambda a: a * 5 if a.ndim > 1 else a, mj.init_params(config, seed=4))
    model = mj.Model(config, params)
    ids = rng.integers(0, config.vocab_size, 90).tolist()
    contexts = [3, 10, 40]
    got = evals.context_perplexity(model, ids, contexts)
    assert got["tokens"] == 90 - 40 and got["context_lengths"] == contexts
    for c, ppl in zip(contexts, got["perplexity"]):
        nll = []
        for i in range(40, 90):  # token i given exactly tokens i-c .. i-1
            logits = np.asarray(mj.forward(config, params, [ids[i - c:i]]))[0, -1].astype(np.float64)
            nll.append(np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - logits[ids[i]])
        assert abs(ppl / np.exp(np.mean(nll)) - 1) <= 1e-4
    assert len(set(np.round(got["perplexity"], 6))) == 3
    with pytest.raises(ValueError, match="largest context"):
        evals.context_perplexity(model, ids[:40], contexts)


def test_score_context_lengths_cli(tmp_path):
    png = tmp_path / "ctx.png"
    proc = subprocess.run(CLI + ["score", "notebooks/data/code.py", "--context-lengths", "16,64,256", "--json",
                                 "--plot", str(png)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["context_lengths"] == [16, 64, 256] and len(result["perplexity"]) == 3 and result["tokens"] > 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run(CLI + ["score", "notebooks/data/code.py", "--context-lengths", "16,100000"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "context" in bad.stderr
