"""Shared fixtures: tiny random HF Mixtral models built in process (no downloads)."""

import os

import numpy as np
import pytest

from mixtral_jax import MixtralConfig

# 8 experts top-2, GQA with N != K, odd sizes: the config that catches routing and layout bugs.
GQA = MixtralConfig(vocab_size=101, d_model=40, n_layers=3, n_heads=6, n_kv_heads=2, head_dim=10,
                    d_ff=37, n_experts=8, top_k=2, max_seq_len=256)
MQA = GQA.replace(n_heads=4, n_kv_heads=1, head_dim=12, n_layers=2)
TOP1 = GQA.replace(top_k=1, n_layers=2)
WINDOW = GQA.replace(n_layers=2, sliding_window=5)


def hf_model(config: MixtralConfig, seed: int = 0, std: float = 0.2):
    """A random HF MixtralForCausalLM (float32, eager attention) for `config`.

    Weights are drawn wider than HF's 0.02 and norms are random so that routing, norms and every
    head matter to the logits.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    hf_config = transformers.MixtralConfig(**{k: v for k, v in config.to_hf().items()
                                              if k not in ("architectures", "model_type")})
    hf_config._attn_implementation = "eager"
    hf_config._experts_implementation = "eager"  # the readable per-expert loop: the reference
    model = transformers.MixtralForCausalLM(hf_config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    return model


def hf_logits(model, tokens) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


@pytest.fixture(autouse=True, scope="session")
def _compilation_cache(tmp_path_factory):
    """One persistent XLA compilation cache for the session (each pytest-xdist worker has its own),
    shared with every subprocess a test starts (through the environment): the suite starts dozens of
    `mixtral-jax` processes that compile the same programs, and drops its own compiled programs after
    each module. Fresh each session, so nothing carries over between runs; a cache the caller already
    chose is left alone."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        yield
        return
    import jax

    settings = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("xla-cache")),
                "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_persistent_cache_min_entry_size_bytes": -1}
    for name, value in settings.items():
        os.environ[name.upper()] = str(value)
        jax.config.update(name, value)
    yield
    for name in settings:
        os.environ.pop(name.upper())
    jax.config.update("jax_compilation_cache_dir", None)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's compiled programs after each test module: the suite compiles thousands, and one
    long-lived process holding them all was seen to abort inside XLA's compiler."""
    yield
    import jax

    jax.clear_caches()
