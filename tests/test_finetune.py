"""Fine-tuning: FSDP steps against one device, LoRA (step 0, learning, resume, merge + export against
transformers), the finetune / merge / plan --train command lines."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax import finetune as ft
from mixtral_jax import lora as lora_lib
from mixtral_jax import train as tr
from mixtral_jax.checkpoint import demo_model_path, save
from tests.tolerances import LOGITS_ATOL

CLI = [sys.executable, "-m", "mixtral_jax.cli"]
# Mixtral's vocabulary, so the v1 tokenizer encodes the chat data.
CHAT = mj.MixtralConfig.tiny().replace(vocab_size=32000, max_seq_len=128)
ALL_TARGETS = ("q", "k", "v", "o", "experts")


def cli(*args, rc=0):
    proc = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == rc, (proc.returncode, proc.stderr[-2000:])
    if rc == 2:
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "base"
    save(path, CHAT, mj.init_params(CHAT, seed=1), tokenizer=mj.Tokenizer().path)
    return path


@pytest.mark.slow
def test_fsdp_steps_equal_one_device_and_shard_as_planned():
    """fsdp=8 and fsdp=4,expert=2 on 8 host devices (a fresh process: tests/fsdp_worker.py)."""
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("fsdp_worker.py"))], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["mesh"] for r in runs] == [{"fsdp": 8}, {"fsdp": 4, "expert": 2}]
    for r in runs:
        assert abs(r["loss"] - r["one_device_loss"]) <= 1e-5
        assert r["param_max_diff"] <= 1e-5 and r["grad_max_rel_diff"] <= 1e-5
        assert r["shares"] == r["planned_shares"]
        assert sorted(set(r["moment_shares"])) == sorted(set(r["shares"]))  # moments shard as parameters
        assert abs(r["per_device_bytes"] - r["planned_bytes"]) <= 0.01 * r["planned_bytes"]
    assert set(runs[0]["matrix_shares"]) == {1 / 8}            # every matrix split 8 ways
    assert set(runs[1]["matrix_shares"]) == {1 / 4, 1 / 8}     # experts 8 ways, the rest over fsdp


def test_lora_step_zero_is_the_base_model_and_only_the_adapter_gets_gradients():
    config = mj.MixtralConfig.tiny()
    params = mj.init_params(config, seed=0)
    lc = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=ALL_TARGETS)
    adapter = lora_lib.init_adapter(config, lc, seed=0)
    tc = tr.TrainConfig(batch_size=2, seq_len=16)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (2, 17)))
    lengths = jnp.array([17, 11])
    base_loss = tr.loss_fn(params, config, tc, tokens, lengths)[0]
    lora_loss = tr.loss_fn(lora_lib.attach(params, adapter, lc), config, tc, tokens, lengths)[0]
    assert float(lora_loss) == float(base_loss)
    grads, _ = tr.accumulated_grads(config, tc, adapter, tokens, lengths, base=params, lora=lc)
    assert jax.tree.structure(grads) == jax.tree.structure(adapter)
    b_norm = sum(float(jnp.sum(g["b"] ** 2)) for layer in grads.values() for g in layer.values())
    assert b_norm > 0  # b = 0 at the start, so the gradient flows into b first


@pytest.mark.slow
def test_lora_training_lowers_the_loss_and_resumes_with_identical_losses(tmp_path):
    """The README's example in small: LoRA on the demo model with the shipped chat sample."""
    demo = mj.load(demo_model_path(), dtype="float32", layout="stacked")
    config, params = demo.config, demo.params
    lc = lora_lib.LoraConfig(rank=8, alpha=16.0)
    examples = ft.read_examples(ft.SAMPLE, mj.Tokenizer(), 64)
    tc = tr.TrainConfig(steps=40, batch_size=8, seq_len=64, learning_rate=1e-3, warmup_steps=0, weight_decay=0.0,
                        log_every=1, save_every=10, eval_every=1000)

    def batches(step):
        return ft.batch(examples, step, tc.batch_size, tc.seq_len, tc.seed)

    whole = tr.train(config, tc, str(tmp_path / "whole"), batches=batches, base=params, lora=lc, progress=False)
    losses = [h["loss"] for h in whole["history"]]
    assert np.mean(losses[-5:]) < losses[0] - 1.0, losses
    tr.train(config, tc, str(tmp_path / "cut"), batches=batches, base=params, lora=lc, progress=False, stop_after=15)
    resumed = tr.train(config, tc, str(tmp_path / "cut"), batches=batches, base=params, lora=lc, progress=False)
    assert [h["loss"] for h in resumed["history"]] == losses[15:]
    with pytest.raises(ValueError, match="lora"):  # another adapter shape cannot resume this run
        tr.train(config, tc, str(tmp_path / "cut"), batches=batches, base=params,
                 lora=lora_lib.LoraConfig(rank=4), progress=False)


def test_batches_cover_each_epoch_once_and_mask_the_answers():
    tok = mj.Tokenizer()
    examples = ft.read_examples(ft.SAMPLE, tok, 64)
    n = len(examples)
    seen = []
    for step in range(-(-n // 8)):
        tokens, lengths, mask = ft.batch(examples, step, 8, 64, seed=3)
        assert tokens.shape == mask.shape == (8, 65) and lengths.shape == (8,)
        for row, length in zip(tokens, lengths):
            seen.append(tuple(row[:length]))
            assert not row[length:].any()
    assert len(set(seen[:n])) == len({tuple(i) for i in examples.ids})  # each example once per epoch
    again = ft.batch(examples, 5, 8, 64, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(again, ft.batch(examples, 5, 8, 64, seed=3)))


def test_merge_and_export_match_transformers_and_the_unmerged_adapter(tmp_path):
    import torch
    import transformers

    config = mj.MixtralConfig.tiny()
    save(tmp_path / "base", config, mj.init_params(config, seed=2))
    lc = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=ALL_TARGETS)
    adapter = lora_lib.init_adapter(config, lc, seed=3)
    rng = np.random.default_rng(4)  # a trained-looking adapter: b away from zero
    adapter = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray(rng.normal(0, 0.05, a.shape), jnp.float32) if path[-1].key == "b" else a, adapter)
    lora_lib.save_adapter(str(tmp_path / "adapter"), adapter, lc)
    cli("merge", tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    cli("export", tmp_path / "merged", tmp_path / "hf", "--format", "hf")

    tokens = np.random.default_rng(5).integers(3, config.vocab_size, (2, 12))
    base = np.asarray(mj.load(tmp_path / "base", dtype="float32")(tokens))
    merged = np.asarray(mj.load(tmp_path / "merged", dtype="float32")(tokens))
    unmerged = {layout: np.asarray(mj.load(tmp_path / "base", dtype="float32", layout=layout,
                                           adapter=tmp_path / "adapter")(tokens)) for layout in ("split", "stacked")}
    hf = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf", experts_implementation="eager",
                                                         attn_implementation="eager").eval()
    with torch.no_grad():
        reference = hf(torch.as_tensor(tokens)).logits.float().numpy()
    assert np.max(np.abs(merged - base)) > 1e-2  # the adapter changes the model
    np.testing.assert_allclose(merged, reference, atol=LOGITS_ATOL, rtol=0)
    for logits in unmerged.values():
        np.testing.assert_allclose(logits, reference, atol=LOGITS_ATOL, rtol=0)


def test_finetune_cli_lora_then_full(tmp_path, chat_ckpt):
    out = json.loads(cli("finetune", chat_ckpt, "sample", tmp_path / "lora", "--lora", "4", "--lora-targets",
                         "q,v,experts", "--steps", "3", "--batch-size", "2", "--seq-len", "64", "--log-every", "1",
                         "--save-every", "2").stdout)
    assert out["steps"] == 3 and out["examples"] == 212 and out["lora"]
    meta = json.loads((tmp_path / "lora" / "adapter" / "adapter.json").read_text())
    assert (meta["rank"], meta["alpha"], meta["targets"]) == (4, 8.0, ["q", "v", "experts"])
    records = [json.loads(line) for line in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all("loss" in r for r in records)
    model = mj.load(chat_ckpt, adapter=tmp_path / "lora" / "adapter")
    assert len(mj.generate(model, [[1, 733]], max_new_tokens=3, stop_tokens=[])[0]) == 3

    out = json.loads(cli("finetune", chat_ckpt, "sample", tmp_path / "full", "--steps", "2", "--batch-size", "2",
                         "--seq-len", "64", "--remat", "layer", "--grad-accum", "2").stdout)
    assert out["steps"] == 2 and not out["lora"]
    tuned = mj.load(tmp_path / "full" / "model")
    assert tuned.config == CHAT and tuned.tokenizer is not None


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}', "invalid JSON"),
    ('{"prompt": "hi"}', '"messages" or "text"'),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "must end with an assistant"),
    ('{"text": 3}', '"text" must be'),
])
def test_finetune_bad_lines_are_input_errors_naming_the_line(tmp_path, chat_ckpt, line, message, capsys):
    from mixtral_jax.cli import main  # in process: the subprocess path is covered above

    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    data = tmp_path / "data.jsonl"
    data.write_text(good + "\n" + line + "\n")
    assert main(["finetune", str(chat_ckpt), str(data), str(tmp_path / "out"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{data}:2:" in err and message in err
    assert not (tmp_path / "out").exists()


def test_plan_train_cli():
    base = ["plan", "--preset", "mixtral-8x7b", "--train", "--batch", "8", "--seq-len", "4096", "--json"]
    full = json.loads(cli(*base, "--mesh", "fsdp=16", "--device-memory", "40GB").stdout)
    lora = json.loads(cli(*base, "--lora", "16", "--device-memory", "141GB").stdout)
    p = full["per_device_bytes"]
    assert p["trainable_params"] == 46_702_792_704
    assert p["optimizer_state"] == 2 * p["gradients"] == 2 * p["parameters"]
    assert p["total"] == sum(p[k] for k in ("parameters", "compute_copy", "gradients", "optimizer_state",
                                            "activations"))
    assert lora["per_device_bytes"]["optimizer_state"] < 1e9 and lora["mode"] == "lora"
    assert full["fits"] is False  # 46.7 B parameters x 18 bytes over 16 devices: 52 GB before activations
    cli("plan", "--preset", "tiny", "--lora", "4", rc=2)
