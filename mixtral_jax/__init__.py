"""mixtral_jax: Mixtral sparse mixture-of-experts in JAX, exact to the reference.

Public API (DESIGN.md §6): MixtralConfig, init_params, init_cache, forward, Model, load, Tokenizer,
generate, generate_stream, make_mesh.
"""

from .checkpoint import load
from .config import MixtralConfig
from .model import Model, forward, init_cache, init_params, param_specs, shard_params
from .sampler import generate, generate_stream
from .sharding import make_mesh
from .tokenizer import Tokenizer

__all__ = ["MixtralConfig", "Model", "Tokenizer", "forward", "generate", "generate_stream", "init_cache",
           "init_params", "load", "make_mesh", "param_specs", "shard_params"]
__version__ = "0.1.0"
