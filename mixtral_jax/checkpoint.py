"""Loading a model from disk."""

from __future__ import annotations

import logging
import os

import jax.numpy as jnp
import numpy as np

from .config import MixtralConfig
from .model import Model, default_dtype
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

DTYPE_NAMES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
TOKENIZER_FILE = "tokenizer.model"


def resolve_dtype(dtype):
    """None -> the platform default; "float32"/"bfloat16"/"float16" or a dtype -> a numpy dtype."""
    if dtype is None:
        return np.dtype(default_dtype())
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
        dtype = DTYPE_NAMES[dtype]
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"not a dtype: {dtype!r}") from None
    if dt not in {np.dtype(t) for t in DTYPE_NAMES.values()}:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dt}")
    return dt


def load(path, *, dtype=None, mesh=None) -> Model:
    """Load a model.

    Args:
      path: a Hugging Face folder (config.json + one or many *.safetensors, with or without
        model.safetensors.index.json), read tensor by tensor without torch.
      dtype: "float32", "bfloat16", "float16" or a jnp dtype; None for float32 on CPU and
        bfloat16 on GPU/TPU.
      mesh: reserved for sharded loading (issue 5); must be None for now.
    Returns:
      Model with `.config`, `.params` (canonical layout) and `.tokenizer` (from the folder's
      tokenizer.model, or None).
    Raises:
      ValueError (mixtral_convert.CheckpointError) naming the file and the problem.
    """
    from mixtral_convert import CheckpointError, read_hf_params  # checkpoint formats, no torch

    if mesh is not None:
        raise NotImplementedError("loading onto a mesh is not supported yet")
    dt = resolve_dtype(dtype)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path}: not a Hugging Face Mixtral folder (no config.json)")
    config = MixtralConfig.from_hf(path)
    log.info("loading %s (%s)", path, dt)
    params = read_hf_params(config, path, lambda a: jnp.asarray(a.astype(dt, copy=False)))
    tok_path = os.path.join(path, TOKENIZER_FILE)
    tokenizer = Tokenizer(tok_path) if os.path.isfile(tok_path) else None
    return Model(config, params, tokenizer)
