"""Shared fixtures: tiny random HF Mixtral models built in process (no downloads)."""

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
