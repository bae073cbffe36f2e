"""Model configuration: one frozen, hashable dataclass, presets, and readers for HF/Mistral files."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Mapping

# Mixtral's released values where a source file is silent or transformers' defaults differ.
MIXTRAL_ROPE_THETA = 1e6
MIXTRAL_CONTEXT = 32768
MIXTRAL_AUX_LOSS_COEF = 0.02


@dataclasses.dataclass(frozen=True)
class MixtralConfig:
    """Hyper-parameters of a Mixtral decoder. Frozen and hashable, so it can be a jit static argument.

    Attributes:
      vocab_size: V, tokenizer vocabulary size.
      d_model: D, residual stream width.
      n_layers: L, decoder blocks.
      n_heads: N, query heads.
      n_kv_heads: K, key/value heads (GQA; N % K == 0).
      head_dim: H, width of one head.
      d_ff: F, hidden width of each SwiGLU expert.
      n_experts: E, experts per MoE layer.
      top_k: experts used per token.
      rope_theta: RoPE base.
      norm_eps: RMSNorm epsilon.
      max_seq_len: longest sequence the model supports (the context).
      sliding_window: attention window in tokens, or None for full causal attention (Mixtral).
      router_aux_loss_coef: weight of the load-balancing loss in training.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    n_experts: int = 8
    top_k: int = 2
    rope_theta: float = MIXTRAL_ROPE_THETA
    norm_eps: float = 1e-5
    max_seq_len: int = MIXTRAL_CONTEXT
    sliding_window: int | None = None
    router_aux_loss_coef: float = MIXTRAL_AUX_LOSS_COEF

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                     "n_experts", "top_k", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MixtralConfig.{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"MixtralConfig.n_heads ({self.n_heads}) must be a multiple of "
                             f"n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"MixtralConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.top_k > self.n_experts:
            raise ValueError(f"MixtralConfig.top_k ({self.top_k}) exceeds n_experts ({self.n_experts})")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"MixtralConfig.{name} must be a positive number, got {value!r}")
        if self.sliding_window is not None and (
                not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"MixtralConfig.sliding_window must be None or a positive integer, "
                             f"got {self.sliding_window!r}")
        if not isinstance(self.router_aux_loss_coef, (int, float)) or self.router_aux_loss_coef < 0:
            raise ValueError(f"MixtralConfig.router_aux_loss_coef must be >= 0, "
                             f"got {self.router_aux_loss_coef!r}")
        # Normalise numeric types so equal configs hash equally (1e6 vs 1000000).
        object.__setattr__(self, "rope_theta", float(self.rope_theta))
        object.__setattr__(self, "norm_eps", float(self.norm_eps))
        object.__setattr__(self, "router_aux_loss_coef", float(self.router_aux_loss_coef))

    @property
    def n_groups(self) -> int:
        """G = N / K, query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes) -> "MixtralConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MixtralConfig":
        """Inverse of `to_dict` (the project's own config format)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown MixtralConfig field(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    # Presets ------------------------------------------------------------------------------------

    @classmethod
    def mixtral_8x7b(cls) -> "MixtralConfig":
        """Mixtral-8x7B-v0.1 (46.7 B parameters)."""
        return cls(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                   d_ff=14336, n_experts=8, top_k=2, rope_theta=1e6, norm_eps=1e-5, max_seq_len=32768,
                   router_aux_loss_coef=0.02)

    @classmethod
    def mixtral_8x22b(cls) -> "MixtralConfig":
        """Mixtral-8x22B-v0.1 (141 B parameters)."""
        return cls(vocab_size=32000, d_model=6144, n_layers=56, n_heads=48, n_kv_heads=8, head_dim=128,
                   d_ff=16384, n_experts=8, top_k=2, rope_theta=1e6, norm_eps=1e-5, max_seq_len=65536,
                   router_aux_loss_coef=0.001)

    @classmethod
    def small(cls) -> "MixtralConfig":
        """The benchmark config of DESIGN.md §5 (0.79 B parameters)."""
        return cls(vocab_size=32000, d_model=1024, n_layers=8, n_heads=16, n_kv_heads=4, head_dim=64,
                   d_ff=3584, n_experts=8, top_k=2)

    @classmethod
    def tiny(cls) -> "MixtralConfig":
        """A few-second model for tests and overhead measurements (DESIGN.md §5)."""
        return cls(vocab_size=1000, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                   d_ff=224, n_experts=8, top_k=2, max_seq_len=2048)

    @classmethod
    def demo(cls) -> "MixtralConfig":
        """The built-in demo model's shape: 8 experts top-2, GQA, the Mixtral v1 vocabulary; ~20 M
        parameters (trained by `mixtral-jax train`; see TRAINING.md)."""
        return cls(vocab_size=32000, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, head_dim=32,
                   d_ff=384, n_experts=8, top_k=2, max_seq_len=512)

    @classmethod
    def preset(cls, name: str) -> "MixtralConfig":
        """A preset by name: mixtral-8x7b, mixtral-8x22b, small, tiny, demo (dashes or underscores)."""
        key = name.replace("-", "_").lower()
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
        return getattr(cls, key)()

    # Readers --------------------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, source: str | os.PathLike | Mapping[str, Any]) -> "MixtralConfig":
        """From a Hugging Face `config.json`: a dict, the file, or the folder holding it."""
        d = _read_json(source, "config.json")
        model_type = d.get("model_type", "mixtral")
        if model_type != "mixtral":
            raise ValueError(f"config.json model_type is {model_type!r}, expected 'mixtral'")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json hidden_act is {d['hidden_act']!r}; Mixtral uses 'silu'")
        if d.get("tie_word_embeddings", False):
            raise ValueError("config.json tie_word_embeddings is true; Mixtral's lm_head is untied")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"config.json rope_type {rope_type!r} is not supported (only 'default')")
        theta = rope.get("rope_theta", d.get("rope_theta", MIXTRAL_ROPE_THETA))
        hidden, heads = _require(d, "hidden_size"), _require(d, "num_attention_heads")
        head_dim = d.get("head_dim") or (hidden // heads if isinstance(hidden, int) and
                                         isinstance(heads, int) and heads else None)
        config = cls(
            vocab_size=_require(d, "vocab_size"),
            d_model=hidden,
            n_layers=_require(d, "num_hidden_layers"),
            n_heads=heads,
            n_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            d_ff=_require(d, "intermediate_size"),
            n_experts=d.get("num_local_experts", 8),
            top_k=d.get("num_experts_per_tok", 2),
            rope_theta=theta,
            norm_eps=d.get("rms_norm_eps", 1e-5),
            max_seq_len=d.get("max_position_embeddings", MIXTRAL_CONTEXT),
            sliding_window=d.get("sliding_window"),
            router_aux_loss_coef=d.get("router_aux_loss_coef", MIXTRAL_AUX_LOSS_COEF),
        )
        config.warn_if_suspicious()
        return config

    @classmethod
    def from_mistral(cls, source: str | os.PathLike | Mapping[str, Any]) -> "MixtralConfig":
        """From Mistral's original `params.json`: a dict, the file, or the folder holding it."""
        d = _read_json(source, "params.json")
        moe = d.get("moe")
        if not isinstance(moe, Mapping):
            raise ValueError("params.json has no 'moe' section: not a mixture-of-experts checkpoint")
        config = cls(
            vocab_size=_require(d, "vocab_size"),
            d_model=_require(d, "dim"),
            n_layers=_require(d, "n_layers"),
            n_heads=_require(d, "n_heads"),
            n_kv_heads=d.get("n_kv_heads") or d["n_heads"],
            head_dim=d.get("head_dim") or d["dim"] // d["n_heads"],
            d_ff=_require(d, "hidden_dim"),
            n_experts=_require(moe, "num_experts"),
            top_k=_require(moe, "num_experts_per_tok"),
            rope_theta=d.get("rope_theta", MIXTRAL_ROPE_THETA),
            norm_eps=d.get("norm_eps", 1e-5),
            max_seq_len=d.get("max_seq_len", MIXTRAL_CONTEXT),
            sliding_window=d.get("sliding_window"),
        )
        config.warn_if_suspicious()
        return config

    def to_hf(self) -> dict[str, Any]:
        """A transformers 5.x `config.json` dict."""
        return {
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "vocab_size": self.vocab_size, "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "intermediate_size": self.d_ff, "num_local_experts": self.n_experts,
            "num_experts_per_tok": self.top_k, "hidden_act": "silu", "rms_norm_eps": self.norm_eps,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "max_position_embeddings": self.max_seq_len, "sliding_window": self.sliding_window,
            "router_aux_loss_coef": self.router_aux_loss_coef, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2,
        }

    def to_mistral(self) -> dict[str, Any]:
        """A Mistral original `params.json` dict."""
        d = {"dim": self.d_model, "n_layers": self.n_layers, "head_dim": self.head_dim,
             "hidden_dim": self.d_ff, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
             "norm_eps": self.norm_eps, "vocab_size": self.vocab_size, "rope_theta": self.rope_theta,
             "max_seq_len": self.max_seq_len,
             "moe": {"num_experts": self.n_experts, "num_experts_per_tok": self.top_k}}
        if self.sliding_window is not None:
            d["sliding_window"] = self.sliding_window
        return d

    def warn_if_suspicious(self) -> None:
        """Warn about settings other ports got wrong for Mixtral (DESIGN.md §3)."""
        if self.sliding_window is not None:
            warnings.warn(f"sliding_window={self.sliding_window} is set, but Mixtral uses full causal "
                          "attention; it will be honoured as given", UserWarning, stacklevel=3)
        if self.rope_theta == 1e4:
            warnings.warn("rope_theta=1e4 is Llama's value; Mixtral uses 1e6", UserWarning, stacklevel=3)


PRESETS = ("mixtral_8x7b", "mixtral_8x22b", "small", "tiny", "demo")


def _require(d: Mapping[str, Any], key: str):
    if key not in d:
        raise ValueError(f"config is missing required field {key!r}")
    return d[key]


def _read_json(source, filename: str) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, filename)
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return d
