"""mixtral_jax.load of Hugging Face folders (no torch at load time) and forward's input checks."""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_convert import CheckpointError, write_folder
from mixtral_jax.checkpoint import param_items
from conftest import GQA, hf_logits, hf_model
from tolerances import LOGITS_ATOL


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    model = hf_model(GQA, seed=5)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path, max_shard_size="30KB")
    return model, path


def test_single_file_without_index_and_fused_names(hf, tmp_path, rng):
    """transformers 5.x in-memory (fused) expert names in one model.safetensors, no index."""
    import safetensors.torch

    model, path = hf
    shutil.copy(path / "config.json", tmp_path)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                str(tmp_path / "model.safetensors"))
    assert any("gate_up_proj" in k for k in model.state_dict())
    tokens = rng.integers(0, GQA.vocab_size, (1, 12))
    logits = mj.forward(GQA, mj.load(tmp_path).params, tokens)
    np.testing.assert_allclose(np.asarray(logits), hf_logits(model, tokens), atol=LOGITS_ATOL, rtol=0)


def test_dtype_and_tokenizer(hf, tmp_path):
    _, path = hf
    m = mj.load(path)
    assert m.tokenizer is None and m.params["embed"].dtype == np.float32
    assert mj.load(path, dtype="bfloat16", layout="stacked").params["layers_1"]["w_up"].dtype == "bfloat16"
    shutil.copytree(path, tmp_path / "with_tok")
    shutil.copy(mj.Tokenizer().path, tmp_path / "with_tok" / "tokenizer.model")
    assert mj.load(tmp_path / "with_tok").tokenizer.vocab_size == 32000
    with pytest.raises(ValueError, match="dtype"):
        mj.load(path, dtype="int4")


def test_write_hf_is_read_back_by_transformers(tmp_path, rng):
    import transformers

    params = jax.tree.map(lambda a: a * 10.0 if a.ndim > 1 else a, mj.init_params(GQA, seed=2))
    write_folder(str(tmp_path / "out"), GQA, param_items(GQA, params), "hf", np.float32)
    hf_back = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "out", experts_implementation="eager",
                                                              attn_implementation="eager")
    tokens = rng.integers(0, GQA.vocab_size, (2, 10))
    np.testing.assert_allclose(np.asarray(mj.forward(GQA, params, tokens)), hf_logits(hf_back, tokens),
                               atol=LOGITS_ATOL, rtol=0)


def test_loading_never_imports_torch(hf):
    _, path = hf
    code = (f"import sys, mixtral_jax as mj; m = mj.load({str(path)!r}); "
            "mj.forward(m.config, m.params, [[1, 2, 3]]); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_sources(hf, tmp_path):
    _, path = hf
    with pytest.raises(CheckpointError, match="no such file"):
        mj.load(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        mj.load(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    shard = sorted(bad.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        mj.load(bad)
    cfg = json.loads((path / "config.json").read_text())
    wrong = tmp_path / "wrong"
    shutil.copytree(path, wrong)
    (wrong / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=36)))
    with pytest.raises(CheckpointError, match="shape"):
        mj.load(wrong)


def test_token_ids_are_range_checked_when_concrete():
    params = mj.init_params(GQA)
    for bad in ([[0, GQA.vocab_size]], [[-1, 3]]):
        with pytest.raises(ValueError, match="out of range"):
            mj.forward(GQA, params, bad)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        mj.forward(GQA, params, [1, 2, 3])
    # Under tracing the check is skipped, so jit and grad of forward still work.
    jitted = jax.jit(lambda p, t: mj.forward(GQA, p, t))(params, np.array([[1, 2, 3]]))
    assert jitted.shape == (1, 3, GQA.vocab_size)
    grads = jax.grad(lambda p: mj.forward(GQA, p, [[1, 2, 3]]).sum())(params)
    assert np.isfinite(np.asarray(grads["layers_0"]["w_gate"])).all()


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_cpu_layout_attention_is_out_in_and_computes_the_same(tmp_path, rng, quantize):
    # The CPU layout (split) stores each attention matrix 2-D [out, in]; loaded either way, through
    # the kernels (<= 16 rows) and XLA's dot (more), it gives the canonical layout's logits.
    from mixtral_jax.model import ATTENTION_INPUT_AXES
    from mixtral_jax.quant import quantize_layer
    from mixtral_convert import convert
    from tolerances import CACHE_ATOL, INT8_LOGITS_ATOL

    config = mj.MixtralConfig.tiny()  # every dimension a multiple of 16, so the kernels take it
    params = mj.init_params(config, seed=8)
    write_folder(str(tmp_path / "hf"), config, param_items(config, params), "hf", np.float32)
    split = mj.load(tmp_path / "hf", layout="split", quantize=quantize)
    stacked = mj.load(tmp_path / "hf", layout="stacked", quantize=quantize)
    for name, n_in in ATTENTION_INPUT_AXES.items():
        canonical = stacked.params["layers_1"][name]
        got = split.params["layers_1"][name]
        for c, g in ((canonical[k], got[k]) for k in ("q", "scale")) if quantize else ((canonical, got),):
            want = np.asarray(c).reshape(int(np.prod(c.shape[:n_in])), -1).T        # [out, in]
            assert g.shape == want.shape and np.array_equal(np.asarray(g), want), name
    models = [split]
    if quantize:  # a checkpoint stored in int8 is split from its stored int8 leaves
        convert(str(tmp_path / "hf"), str(tmp_path / "q"), quantize="int8")
        models.append(mj.load(tmp_path / "q", layout="split"))
        assert jax.tree.map(np.shape, models[1].params) == jax.tree.map(np.shape, split.params)
    atol = INT8_LOGITS_ATOL if quantize else CACHE_ATOL  # int8: AVX2 rounds one row to int16
    for rows in (1, 5, 24):
        tokens = rng.integers(0, config.vocab_size, (1, rows))
        want = np.asarray(stacked(tokens))
        for model in models:
            np.testing.assert_allclose(np.asarray(model(tokens)), want, atol=atol, rtol=0)
