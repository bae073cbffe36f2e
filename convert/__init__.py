"""Checkpoint formats (installed as `mixtral_convert`): key tables, permutations, safetensors I/O.

Nothing here imports torch; only reading pickled `.pth` files (an explicit opt-in) does.
"""

from .errors import CheckpointError
from .hf import read_hf_params, write_hf
from .safetensors_io import SafetensorsFile, write_safetensors

__all__ = ["CheckpointError", "SafetensorsFile", "read_hf_params", "write_hf", "write_safetensors"]
