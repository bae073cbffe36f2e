"""The generate / chat / score commands, and scoring against HF perplexity."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax.scoring import score_tokens
from conftest import hf_model

# Mixtral's vocabulary, so the checkpoint without a tokenizer falls back to the v1 tokenizer.
CONFIG = mj.MixtralConfig(vocab_size=32000, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                          d_ff=48, max_seq_len=128)
CLI = [sys.executable, "-m", "mixtral_jax.cli"]
TEXT = "The quick brown fox jumps over the lazy dog. Ça va? 🙂\n" * 3


def cli(*args, rc=0, stdin=None):
    proc = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, input=stdin)
    assert proc.returncode == rc, (proc.returncode, proc.stderr)
    if rc == 2:
        lines = proc.stderr.strip().splitlines()
        assert lines and "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = hf_model(CONFIG, seed=4, std=0.05)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    return model, path


def hf_nll(model, ids):
    import torch

    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


def test_score_equals_hf_perplexity(ckpt, tmp_path):
    model, path = ckpt
    f = tmp_path / "text.txt"
    f.write_text(TEXT, encoding="utf-8")
    got = json.loads(cli("score", f, "--checkpoint", path, "--json").stdout)
    ids = mj.Tokenizer().encode(TEXT, bos=True)
    nll = hf_nll(model, ids)
    assert got["tokens"] == len(ids) - 1
    assert abs(got["perplexity"] / math.exp(nll.mean()) - 1) <= 1e-4
    assert abs(got["nll"] / nll.mean() - 1) <= 1e-4
    assert "perplexity" in cli("score", f, "--checkpoint", path).stdout


def test_windowed_score_keeps_half_a_window_of_context(ckpt):
    model, path = ckpt
    ours = mj.load(path)
    ids = np.random.default_rng(0).integers(3, 32000, 300).tolist()
    window = 64
    got = score_tokens(ours, ids, window=window)
    # Reference: each token after the first window scored by HF with the window ending at it.
    expected, end, scored = [], 0, 1
    while scored < len(ids):
        end = min(len(ids), window if end == 0 else end + window // 2)
        start = max(0, end - window)
        nll = hf_nll(model, ids[start:end])
        expected += list(nll[scored - start - 1:])
        scored = end
    assert len(expected) == len(ids) - 1 == got["tokens"]
    assert abs(got["nll"] / np.mean(expected) - 1) <= 1e-4
    assert abs(score_tokens(ours, ids[:60], window=64)["nll"] / hf_nll(model, ids[:60]).mean() - 1) <= 1e-4


def test_no_echo_prints_the_continuation_alone(ckpt):
    """--no-echo is round 1's output: the new tokens decoded on their own, streamed or not."""
    _, path = ckpt
    base = ["generate", "--checkpoint", path, "--prompt", "def fibonacci(n):", "--max-new-tokens", 12, "--no-echo"]
    out, streamed = cli(*base).stdout, cli(*base, "--stream").stdout
    model = mj.load(path)
    tok = mj.Tokenizer()
    ids = mj.generate(model, [tok.encode("def fibonacci(n):")], max_new_tokens=12)[0]
    assert out == streamed == tok.decode(ids) + "\n"


@pytest.mark.parametrize("prompt", ["def fibonacci(n):", "Ça va? 🙂 x", "x ="])
def test_generate_prints_the_prompt_and_its_continuation_in_context(ckpt, prompt):
    _, path = ckpt
    model, tok = mj.load(path), mj.Tokenizer()
    ids = tok.encode(prompt)
    new = mj.generate(model, [ids], max_new_tokens=16)[0]
    base = ["generate", "--checkpoint", path, "--prompt", prompt, "--max-new-tokens", 16]
    out, streamed = cli(*base).stdout, cli(*base, "--stream").stdout
    assert out == streamed == tok.decode(ids + new) + "\n"
    assert out.startswith(prompt)
    record = json.loads(cli(*base, "--json").stdout)
    assert record == {"prompt": prompt, "text": tok.decode(ids + new)[len(tok.decode(ids)):], "tokens": new,
                      "finish_reason": "length"}


def test_generate_chat_flag_uses_the_inst_template(ckpt):
    _, path = ckpt
    model = mj.load(path)
    tok = mj.Tokenizer()
    ids = mj.generate(model, [tok.encode_chat([{"role": "user", "content": "Hi"}])], max_new_tokens=6)[0]
    out = cli("generate", "--checkpoint", path, "--prompt", "Hi", "--chat", "--max-new-tokens", 6).stdout
    assert out == tok.decode(ids) + "\n"


def test_batch_file_keeps_order_and_reports_bad_lines(ckpt, tmp_path):
    _, path = ckpt
    lines = ['{"prompt": "Hello there"}', '{"tokens": [1, 5, 40000]}', "not json",
             '{"tokens": [1, 2, 3], "temperature": 0.5, "max_new_tokens": 3, "seed": 4}',
             '{"prompt": "A much longer prompt that sorts last in its batch, surely", "top_p": 0}',
             '{"prompt": "x", "max_new_tokens": 500}', '{"prompt": "Short"}']
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    proc = cli("generate", "--checkpoint", path, "--input", src, "--output", dst, "--max-new-tokens", 5,
               "--batch-size", 2, rc=2)
    out = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [r["index"] for r in out] == list(range(7))
    assert [("error" in r) for r in out] == [False, True, True, False, True, True, False]
    assert "out of range" in out[1]["error"] and "top_p" in out[4]["error"]
    assert "exceeds the context" in out[5]["error"]
    assert len(proc.stderr.strip().splitlines()) == 4
    model, tok = mj.load(path), mj.Tokenizer()
    alone = mj.generate(model, [tok.encode("Hello there")], max_new_tokens=5)[0]
    assert out[0]["tokens"] == alone and out[0]["text"] == tok.decode(alone)
    assert out[3]["tokens"] == mj.generate(model, [[1, 2, 3]], max_new_tokens=3, temperature=0.5, seed=4)[0]


def test_chat_streams_replies(ckpt):
    _, path = ckpt
    proc = cli("chat", "--checkpoint", path, "--max-new-tokens", 5, stdin="Hello\nAnd again\n")
    assert proc.stdout.count("> ") >= 2 and len(proc.stdout) > 10


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "0"], "max_new_tokens"), (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"), (["--top-p", "1.5"], "top_p"), (["--top-k", "-2"], "top_k"),
    (["--min-p", "2"], "min_p"), (["--max-new-tokens", "200"], "exceeds the context"),
    (["--prompt", "word " * 200], "exceeds the context"),
])
def test_generate_rejects_bad_values_with_one_line(ckpt, args, message):
    _, path = ckpt
    base = ["generate", "--checkpoint", path]
    if "--prompt" not in args:
        base += ["--prompt", "hello"]
    proc = cli(*base, *args, rc=2)
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["generate", "--checkpoint", "/nonexistent", "--prompt", "hi"], "no such file"),
    (["generate", "--checkpoint", ".", "--prompt", "hi", "--input", "x.jsonl"], "either --prompt"),
    (["score", "/nonexistent.txt", "--checkpoint", "."], "cannot read"),
    (["generate", "--prompt", "hi", "--bogus"], "unrecognized"),
])
def test_usage_errors(args, message):
    assert message in cli(*args, rc=2).stderr


def test_generate_uses_the_built_in_demo_model():
    """The README's first command: no --checkpoint means the demo model shipped in the package."""
    out = cli("generate", "--prompt", "def fibonacci(n):", "--max-new-tokens", 24).stdout
    assert out.startswith("def fibonacci(n):") and len(out) > len("def fibonacci(n):\n")


def test_verbose_logs_this_projects_progress_alone():
    """-v: the library's INFO lines on stderr (loading, which decode path runs), none of orbax's
    per-array INFO or JAX's backend search; stdout is the same as without it."""
    args = ("generate", "--prompt", "def fibonacci(n):", "--max-new-tokens", 6)
    quiet, verbose = cli(*args), cli("-v", *args)
    assert verbose.stdout == quiet.stdout and quiet.stderr == ""
    lines = verbose.stderr.splitlines()
    assert any(line.startswith("INFO mixtral_jax.checkpoint: loading") for line in lines), lines[:5]
    assert all(line.split(" ", 2)[1].startswith("mixtral_jax.") for line in lines if line.startswith("INFO")), lines


# ---- generation_config.json: checkpoint defaults under explicit flags ----

def with_generation_config(path, tmp_path, config) -> str:
    """A copy of the HF folder `path` with `config` as its generation_config.json (str: written as is)."""
    import shutil

    dst = tmp_path / "with_gc"
    shutil.copytree(path, dst)
    (dst / "generation_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return str(dst)


GC = {"do_sample": True, "temperature": 0.9, "top_k": 30, "repetition_penalty": 1.3, "max_new_tokens": 9,
      "bos_token_id": 1, "transformers_version": "5.0"}


def test_generation_config_gives_cli_defaults_and_flags_win(ckpt, tmp_path):
    _, path = ckpt
    folder = with_generation_config(path, tmp_path, GC)
    model, tok = mj.load(folder), mj.Tokenizer()
    assert model.generation_config == {k: v for k, v in GC.items() if k not in ("bos_token_id", "transformers_version")}
    ids = tok.encode("Hello there")
    sampled = mj.generate(model, [ids], max_new_tokens=9, temperature=0.9, top_k=30, repetition_penalty=1.3)[0]
    assert mj.generate(model, [ids], **model.generation_config_kwargs())[0] == sampled
    greedy = mj.generate(model, [ids], max_new_tokens=9)[0]          # the Python API stays greedy
    assert sampled != greedy and mj.generate(mj.load(path), [ids], max_new_tokens=9)[0] == greedy
    base = ["generate", "--checkpoint", folder, "--prompt", "Hello there", "--json"]
    assert json.loads(cli(*base).stdout)["tokens"] == sampled
    flagged = json.loads(cli(*base, "--temperature", "0", "--max-new-tokens", "5").stdout)["tokens"]
    assert flagged == mj.generate(model, [ids], max_new_tokens=5, repetition_penalty=1.3)[0]
    assert json.loads(cli(*base, "--repetition-penalty", "1", "--temperature", "0").stdout)["tokens"] == greedy
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"                 # batch mode too
    src.write_text('{"prompt": "Hello there"}\n{"prompt": "Hello there", "temperature": 0}\n')
    cli("generate", "--checkpoint", folder, "--input", src, "--output", dst)
    penalised_greedy = mj.generate(model, [ids], max_new_tokens=9, repetition_penalty=1.3)[0]
    assert [json.loads(x)["tokens"] for x in dst.read_text().splitlines()] == [sampled, penalised_greedy]


def test_generation_config_greedy_unless_do_sample_and_eos_stops(ckpt, tmp_path):
    _, path = ckpt
    model, tok = mj.load(path), mj.Tokenizer()
    ids = tok.encode("Once upon")
    free = mj.generate(model, [ids], max_new_tokens=12, stop_tokens=[])[0]
    stop = free[3]
    folder = with_generation_config(path, tmp_path, {"temperature": 1.7, "top_p": 0.5, "eos_token_id": [stop, 2]})
    record = json.loads(cli("generate", "--checkpoint", folder, "--prompt", "Once upon", "--max-new-tokens", 12,
                            "--json").stdout)
    assert record["tokens"] == free[:free.index(stop) + 1] and record["finish_reason"] == "stop"
    assert mj.load(folder).generation_config_kwargs() == {"temperature": 0.0, "stop_tokens": [stop, 2]}


@pytest.mark.parametrize("content, message", [
    ("{not json", "invalid JSON"), ({"temperature": "hot"}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"eos_token_id": 40000}, "eos_token_id"),
    ({"do_sample": "yes"}, "do_sample"), ({"presence_penalty": 3}, "presence_penalty"), ("[1, 2]", "object"),
])
def test_malformed_generation_config_exits_2_naming_file_and_key(ckpt, tmp_path, content, message):
    _, path = ckpt
    folder = with_generation_config(path, tmp_path, content)
    proc = cli("generate", "--checkpoint", folder, "--prompt", "hi", rc=2)
    assert message in proc.stderr and "generation_config.json" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_bench_runs_side_by_side_on_tiny():
    # One weight type's kernels-on/off child processes (each compiles its own programs), not three.
    report = json.loads(cli("bench", "--config", "tiny", "--runs", "1", "--weight-types", "float32", "--json").stdout)
    assert set(report["jax"]["prefill"]) == {"16", "100", "512"} and set(report["jax"]["decode"]) == {"1", "8"}
    assert set(report["decode_paths"]) <= {"float32/on", "float32/off"} and "float32/off" in report["decode_paths"]
    assert all(r["1"] > 0 and r["8"] > 0 for r in report["decode_paths"].values())
    for r in report["jax"]["decode"].values():
        assert r["tok_s"] > 0 and r["speedup_vs_hf"] > 0 and 0 < r["bandwidth_fraction"]
    assert 0 < report["jax"]["prefill"]["512"]["matmul_fraction"] < 2
    assert 1 <= report["jax"]["compile_sweep"]["programs"] <= 10
    assert report["probes"]["read_bandwidth"] > 1e9 and report["peak_rss_over_weights"] > 1
